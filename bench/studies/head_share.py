"""Where the time goes: the second-order head against the backbone, in onnxruntime and in PyTorch.

onnxruntime: one profiled session (``SessionOptions.enable_profiling``); each kernel's
time is charged to the part of the model its node came from, read from the metadata
the exporter writes on every node (``namespace``: the module path; the stack trace
separates the covariance from the Newton-Schulz products, which are functions of the
head, not modules). Nodes that onnxruntime created itself (``relu_3_nchwc``, fused
``FusedMatMul``) carry the name of an original node or of its output; the NCHWc layout
reorders it inserts are counted apart. PyTorch: each part timed on its own input, in
alternating rounds. Next to both, each part's share of the FLOPs.

    .venv/bin/python -m bench.studies.head_share [--quick]
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from bench.common import (
    Settings,
    Worker,
    alternate,
    build_serving,
    entry,
    export,
    images,
    md_table,
    run_part,
    stage,
)

# The model's parts, in forward order; the head's are the last six.
PARTS = (
    "input normalization",
    "backbone: stem",
    "backbone: layer1",
    "backbone: layer2",
    "backbone: layer3",
    "backbone: layer4",
    "head: reduce 1x1 conv",
    "head: re-weighting stages",
    "head: covariance",
    "head: Newton-Schulz",
    "head: vectorization",
    "head: fc",
    "softmax and outputs",
    "NCHWc layout reorders",
)
HEAD_PARTS = tuple(p for p in PARTS if p.startswith("head:"))
BACKBONE_PARTS = tuple(p for p in PARTS if p.startswith("backbone:"))


def part_of(node: onnx.NodeProto) -> str:
    """Which part of the model an exported node belongs to (from the exporter's metadata)."""
    from export.onnx_graph import module_path  # here, like torch: the module's import stays light

    path = module_path(node)
    module = path[1] if len(path) > 2 else ""  # len 2: an op called by the serving wrapper itself
    if not module:
        return "softmax and outputs" if node.op_type in ("Softmax", "Squeeze") else "input normalization"
    if module.startswith("model.layer"):
        return f"backbone: {module.removeprefix('model.')}"
    if module in ("model.conv1", "model.bn1", "model.relu", "model.maxpool"):
        return "backbone: stem"
    if module == "model.fc":
        return "head: fc"
    if module == "model.head":
        sub = path[2] if len(path) > 3 else ""
        if sub.startswith("model.head.layer_reduce"):
            return "head: reduce 1x1 conv"
        if sub.startswith("model.head.AtMp"):
            return "head: re-weighting stages"
        if sub.startswith("model.head.vectorize"):
            return "head: vectorization"
        trace = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.stack_trace", "")
        newton = max(trace.rfind("newton_schulz"), trace.rfind("sqrtm"))
        return "head: Newton-Schulz" if newton > trace.rfind("covariance") else "head: covariance"
    return "softmax and outputs"


def node_parts(model: onnx.ModelProto) -> dict[str, str]:
    """Node names and output names of the exported graph -> part."""
    parts: dict[str, str] = {}
    for node in model.graph.node:
        part = part_of(node)
        parts[node.name] = part
        for output in node.output:
            parts.setdefault(output, part)
    return parts


def profiled_part(name: str, parts: dict[str, str]) -> str:
    """The part of a node onnxruntime ran, from its (possibly rewritten) name."""
    if name.startswith(("ReorderInput", "ReorderOutput")):
        return "NCHWc layout reorders"
    base = name.split("/")[0]
    base = re.sub(r"(_token_\d+)+$", "", base)
    base = base.removesuffix("_nchwc")
    for candidate in (base, f"node_{base}"):
        if candidate in parts:
            return parts[candidate]
    return "unattributed"


def ort_profile(path: Path, batch: int, crop: int, runs: int, work: Path) -> dict[str, float]:
    """Mean kernel milliseconds per part for one ``run`` at ``batch``."""
    from export.verify import session

    parts = node_parts(onnx.load(str(path), load_external_data=False))
    sess = session(path, enable_profiling=True, profile_file_prefix=str(work / f"profile_b{batch}"))
    x = images(batch, crop)
    sess.run(None, {"image": x})  # warm-up (also profiled; dropped below)
    for _ in range(runs):
        sess.run(None, {"image": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    run_starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first_timed = run_starts[1] if len(run_starts) > 1 else 0
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed:
            totals[profiled_part(e["name"].removesuffix("_kernel_time"), parts)] += e["dur"] / 1e3 / runs
    return dict(totals)


def flop_shares(settings: Settings) -> dict[str, float]:
    """GFLOP per image per part, from torch's FLOP counter (per module) and the head's shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    serving, _ = build_serving(settings)
    x = torch.zeros(1, settings.crop, settings.crop, 3, dtype=torch.uint8)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        serving(x)
    counts = counter.get_flop_counts()

    def module(name: str) -> float:
        return sum(counts.get(name, {}).values()) / 1e9

    head = serving.model.head
    d, m = head.dim, (settings.crop // 16) ** 2
    products = 3 * head.iterations - 3  # Newton-Schulz products after skipping the no-ops
    out = {f"backbone: layer{i}": module(f"ServingModel.model.layer{i}") for i in range(1, 5)}
    out["backbone: stem"] = module("ServingModel.model.conv1")
    out["head: reduce 1x1 conv"] = module("ServingModel.model.head.layer_reduce")
    out["head: re-weighting stages"] = sum(
        module(f"ServingModel.model.head.AtMp{i}") for i in range(1, head.num_stages + 1)
    )
    out["head: covariance"] = 2 * d * d * m / 1e9
    out["head: Newton-Schulz"] = products * 2 * d**3 / 1e9
    out["head: fc"] = module("ServingModel.model.fc")
    return out


def eager_parts_engine(settings: Settings, batch: int) -> Callable[[str], object]:
    """``fn(part)`` runs one part of the PyTorch model on that part's real input."""
    import torch

    from training.layers import covariance_pool, sqrtm_newton_schulz

    serving, _ = build_serving(settings)
    model, head = serving.model, serving.model.head
    x = torch.from_numpy(images(batch, settings.crop))
    with torch.inference_mode():
        normalized = x.permute(0, 3, 1, 2).float() * serving.scale + serving.shift
        features = model.forward_features(normalized)
        z = head.layer_reduce_relu(head.layer_reduce_bn(head.layer_reduce(features)))
        feats = z
        for s in head.stages():
            feats, _ = s(feats, z)
        cov = covariance_pool(feats, head.eps)
        root = sqrtm_newton_schulz(cov, head.iterations)
        vec = head.vectorize(root)

    def stages() -> object:
        f = z
        for s in head.stages():
            f, _ = s(f, z)
        return f

    fns: dict[str, Callable[[], object]] = {
        "backbone (stem + layer1-4)": lambda: model.forward_features(normalized),
        "head: reduce 1x1 conv": lambda: head.layer_reduce_relu(head.layer_reduce_bn(head.layer_reduce(features))),
        "head: re-weighting stages": stages,
        "head: covariance": lambda: covariance_pool(feats, head.eps),
        "head: Newton-Schulz": lambda: sqrtm_newton_schulz(cov, head.iterations),
        "head: vectorization": lambda: head.vectorize(root),
        "head: fc": lambda: model.fc(vec),
        "whole model": lambda: serving(x),
    }

    def run(part: str) -> object:
        with torch.inference_mode():
            return fns[part]()

    return run


EAGER_PARTS = (
    "backbone (stem + layer1-4)",
    "head: reduce 1x1 conv",
    "head: re-weighting stages",
    "head: covariance",
    "head: Newton-Schulz",
    "head: vectorization",
    "head: fc",
    "whole model",
)


def run(settings: Settings, work: Path, onnx_path: Path | None = None) -> tuple[dict[str, Any], str]:
    if onnx_path is None:
        serving, _ = build_serving(settings)
        onnx_path = export(serving, work / "model.onnx", settings.crop)
        del serving
    batches = (1, 8) if not settings.quick else (1, 4)
    runs = 3 if not settings.quick else 2
    profiles = {}
    for batch in batches:
        with stage(f"onnxruntime profile, batch {batch}, {runs} runs"):
            profiles[batch] = ort_profile(onnx_path, batch, settings.crop, runs, work)
    flops = flop_shares(settings)
    total_flop = sum(flops.values())
    eager_batch = batches[-1]
    with (
        stage(f"PyTorch eager, part by part, batch {eager_batch}"),
        Worker(eager_parts_engine, settings, eager_batch) as w,
    ):
        series = alternate({p: w.bind(p) for p in EAGER_PARTS}, max(2, settings.rounds - 2))
    eager_ms = {p: 1e3 * s.median for p, s in series.items()}

    rows, table = [], []
    for part in (*PARTS, "unattributed"):
        if part == "unattributed" and not any(part in p for p in profiles.values()):
            continue
        row = {"part": part, "gflop_per_image": flops.get(part)}
        cells: list[Any] = [part]
        for batch, prof in profiles.items():
            total = sum(prof.values())
            row[f"onnxruntime_ms_b{batch}"] = prof.get(part, 0.0)
            row[f"onnxruntime_share_b{batch}"] = prof.get(part, 0.0) / total
            cells += [f"{prof.get(part, 0.0):.1f}", f"{100 * prof.get(part, 0.0) / total:.1f}%"]
        share = flops[part] / total_flop if part in flops else None
        cells.append(f"{100 * share:.1f}%" if share is not None else "")
        rows.append(row)
        table.append(cells)

    def group(prof: dict[str, float], names: tuple[str, ...]) -> float:
        return sum(prof.get(n, 0.0) for n in names) / sum(prof.values())

    summary = {
        f"b{batch}": {
            "head_share_time": group(prof, HEAD_PARTS),
            "backbone_share_time": group(prof, BACKBONE_PARTS),
            "kernel_ms_total": sum(prof.values()),
        }
        for batch, prof in profiles.items()
    }
    head_flop = sum(flops[p] for p in HEAD_PARTS if p in flops) / total_flop
    summary["head_share_flop"] = head_flop
    eager_whole = eager_ms["whole model"]
    eager_head = sum(v for k, v in eager_ms.items() if k.startswith("head:"))
    summary["eager"] = {"batch": eager_batch, "head_share_time": eager_head / eager_whole, "ms": eager_ms}

    headers = ["part"]
    for batch in profiles:
        headers += [f"ORT ms (batch {batch})", "share"]
    headers.append("FLOP share")
    head_line = ", ".join(
        f"batch {b}: head {100 * summary[f'b{b}']['head_share_time']:.1f}% / backbone "
        f"{100 * summary[f'b{b}']['backbone_share_time']:.1f}%"
        for b in profiles
    )
    eager_rows = [[p, f"{eager_ms[p]:.1f}", f"{100 * eager_ms[p] / eager_whole:.1f}%"] for p in EAGER_PARTS]
    markdown = (
        f"### Where the time goes ({settings.arch}, {settings.crop}x{settings.crop}, fp32)\n\n"
        "onnxruntime kernel time per part (profiler, grouped by the exporter's node metadata):\n\n"
        + md_table(headers, table)
        + f"\n\nHead (reduce conv, re-weighting stages, covariance, Newton-Schulz, vectorization, fc) vs backbone "
        f"in onnxruntime: {head_line}; the head is {100 * head_flop:.1f}% of the FLOPs.\n\n"
        f"PyTorch eager, each part timed alone on its real input (batch {eager_batch}, medians of alternating "
        f"rounds; head parts add up to {100 * eager_head / eager_whole:.1f}% of the whole model):\n\n"
        + md_table(["part", "eager ms", "of whole model"], eager_rows)
        + "\n"
    )
    return {"arch": settings.arch, "crop": settings.crop, "rows": rows, "summary": summary}, markdown


def main() -> int:
    return run_part("head_share", __doc__, run)


if __name__ == "__main__":
    entry(main)
