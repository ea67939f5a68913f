"""Where the INT8 model's top-1 changes come from: one module group quantized at a time
(``--sensitivity``), and the quantized graph re-run with other bit widths (``--bit-widths``).

Bit widths: the INT8 recipe's top-1 changes could come from the 8-bit weights, the 8-bit activations or both,
and no calibration choice tells them apart. Here the quantized model itself is rewritten: every
activation Quantize/Dequantize pair gets N bits over the same calibrated range (onnxruntime's
``com.microsoft`` Q/DQ take 16-bit integers), or is removed; every weight is re-rounded to M bits
per output channel from the fp32 weights it was quantized from, or left in fp32. onnxruntime then
runs these graphs in fp32 arithmetic on the rounded values: a simulation (no fast kernel exists
for 10-bit activations), exact where nothing is rounded (a test checks that), close to the real
INT8 kernels at 8/8.

Both run on ``bench/low_precision.py``'s trained model (its table comes first); results in
docs/performance.md section 3.

    .venv/bin/python -m bench.studies.int8 [--quick] [--sensitivity] [--bit-widths]   # neither flag: both
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bench.common import Settings, entry, log, md_table, run_part, stage
from export.verify import probabilities

# (activation bits, weight bits); None = fp32. The first is the INT8 model as simulated here.
CONFIGURATIONS: tuple[tuple[int | None, int | None], ...] = (
    (8, 8),
    (8, None),
    (None, 8),
    (10, 8),
    (10, None),
    (10, 10),
    (12, 12),
)
_INT8 = onnx.TensorProto.INT8
HEADERS = ("configuration", "top-1 changes vs fp32", "where fp32's margin >= 0.1", "max |Δp|", "rms Δ top-2 log-odds")


def label(activation_bits: int | None, weight_bits: int | None) -> str:
    def bits(n: int | None) -> str:
        return "fp32" if n is None else f"{n}-bit"

    return f"activations {bits(activation_bits)}, weights {bits(weight_bits)}"


def _round_weights(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-output-channel rounding, as onnxruntime quantizes weights (scale = max |w| / (2^(bits-1) - 1))."""
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(w).reshape(len(w), -1).max(1).reshape((-1,) + (1,) * (w.ndim - 1)) / levels
    scale = np.where(scale == 0, 1, scale)
    return (np.clip(np.round(w / scale), -levels, levels) * scale).astype(np.float32)


def _activation_grid(scale: float, zero_point: int, bits: int) -> tuple[float, int]:
    """A ``bits``-bit grid over what the 8-bit one covers: its 256 steps, which reach half a step past
    both ends (a value there rounds to the end with at most the usual half-step error), or from exactly 0
    up when the zero point is 0 (the clamp at 0 stands for a ReLU the quantizer removed)."""
    levels = 2**bits - 1
    if zero_point == 0:
        return scale * 255.5 / levels, 0
    return scale * 256 / levels, round((zero_point + 0.5) * levels / 256)


def simulate(
    int8_path: Path, prepared_path: Path, out_path: Path, activation_bits: int | None, weight_bits: int | None
) -> Path:
    """Write ``int8_path``'s graph with ``activation_bits`` / ``weight_bits`` (None: fp32) to ``out_path``.

    ``prepared_path`` is the fp32 model the quantizer read (``int8_prepared.onnx`` in the work folder
    of :func:`export.precision.quantize_int8`): its initializers are the weights before rounding.
    """
    model = onnx.load(str(int8_path))
    graph = model.graph
    fp32_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(prepared_path)).graph.initializer}
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped: set[int] = set()
    rewired: dict[str, str] = {}
    relus: dict[int, onnx.NodeProto] = {}  # a removed Quantize's replacement, in its place
    added: list[onnx.TensorProto] = []
    for node in graph.node:
        # At 8 bits the activation pairs stay as the quantizer wrote them.
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and activation_bits != 8:
            pairs = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
            scale = float(numpy_helper.to_array(initializers[node.input[1]]))
            zero_point = int(numpy_helper.to_array(initializers[node.input[2]]))
            if activation_bits is None:
                source = node.input[0]
                if zero_point == 0:
                    # The quantizer drops a ReLU whose output is quantized with zero point 0 (the clamp at 0
                    # does its work): without the pair, it has to come back.
                    source = node.output[0] + "_relu"
                    relus[id(node)] = helper.make_node("Relu", [node.input[0]], [source])
                dropped.update(id(n) for n in (node, *pairs))
                rewired.update({pair.output[0]: source for pair in pairs})
            else:
                new_scale, new_zero_point = _activation_grid(scale, zero_point, activation_bits)
                scale_name, zero_name = node.output[0] + "_sim_scale", node.output[0] + "_sim_zero_point"
                added += [
                    numpy_helper.from_array(np.array(new_scale, np.float32), scale_name),
                    numpy_helper.from_array(np.array(new_zero_point, np.uint16), zero_name),
                ]
                for n in (node, *pairs):
                    n.input[1], n.input[2] = scale_name, zero_name
                    n.domain = "com.microsoft"  # 16-bit Q/DQ; the default domain's need opset 21
        elif (
            node.op_type == "DequantizeLinear"
            and node.input[0] in initializers
            and initializers[node.input[0]].data_type == _INT8
        ):
            weight = fp32_weights[node.input[0].removesuffix("_quantized")]
            rounded = weight.astype(np.float32) if weight_bits is None else _round_weights(weight, weight_bits)
            dropped.add(id(node))
            added.append(numpy_helper.from_array(rounded, node.output[0]))
    kept = [relus.get(id(n), n) for n in graph.node if id(n) not in dropped or id(n) in relus]
    for node in kept:
        for k, name in enumerate(node.input):
            while name in rewired:  # a pair that fed another pair
                name = rewired[name]
            node.input[k] = name
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(added)
    onnx.save(model, str(out_path))
    return out_path


def study(
    int8_path: Path,
    prepared_path: Path,
    images: np.ndarray,
    reference: np.ndarray,
    work: Path,
    compare: dict[str, np.ndarray] | None = None,
) -> tuple[list[dict], str]:
    """Top-1 changes against ``reference`` (fp32 probabilities on ``images``) for every configuration,
    with ``compare``'s probabilities (e.g. bf16 autocast) as extra rows."""
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    # What a flip needs: noise in the log-odds of fp32's top-1 against its runner-up.
    order = np.argsort(reference, axis=1)
    first, second = order[:, -1:], order[:, -2:-1]

    def log_odds(probs: np.ndarray) -> np.ndarray:
        return np.log(np.take_along_axis(probs, first, 1)) - np.log(np.take_along_axis(probs, second, 1))

    def row(name: str, probs: np.ndarray) -> dict:
        differ = probs.argmax(1) != reference.argmax(1)
        return {
            "configuration": name,
            "top1_changes": int(differ.sum()),
            "confident_changes": int((differ & (margin >= 0.1)).sum()),
            "max_abs_diff_probability": float(np.abs(probs - reference).max()),
            "rms_diff_top2_log_odds": float(np.sqrt(np.mean((log_odds(probs) - log_odds(reference)) ** 2))),
        }

    rows = []
    for activation_bits, weight_bits in CONFIGURATIONS:
        name = label(activation_bits, weight_bits)
        with stage(f"bit widths: {name}"):
            out = work / f"sim_a{activation_bits}_w{weight_bits}.onnx"
            simulate(int8_path, prepared_path, out, activation_bits, weight_bits)
            probs = probabilities(out, images)
            rows.append({"activation_bits": activation_bits, "weight_bits": weight_bits, **row(name, probs)})
            out.unlink()
        log(f"   {name}: {rows[-1]['top1_changes']} top-1 changes")
    rows += [row(name, probs) for name, probs in (compare or {}).items()]
    table = [
        [r["configuration"], r["top1_changes"], r["confident_changes"], f"{r['max_abs_diff_probability']:.3f}",
         f"{r['rms_diff_top2_log_odds']:.4f}"]
        for r in rows
    ]  # fmt: skip
    markdown = (
        f"### INT8 at other bit widths (simulated, {len(images)} held-out images)\n\n"
        + md_table(HEADERS, table)
        + "\n\nThe INT8 model's QDQ graph with its activations and weights rounded to other bit widths over the "
        "same calibrated ranges (`bench/studies/int8.py`), run in fp32 arithmetic. The last column is the noise "
        "a flip needs: the rms change of log(p1 / p2), fp32's top-1 against its runner-up.\n"
    )
    return rows, markdown


def sensitivity(fp32: Path, calibration: np.ndarray, val_x: np.ndarray, work: Path) -> tuple[list[dict], str]:
    """Where the flips come from: one module group at a time quantized (the rest fp32), its top-1
    changes and largest probability change against fp32 on the held-out images."""
    from export.onnx_graph import module_path
    from export.precision import quantize_int8

    graph = onnx.load(str(fp32), load_external_data=False).graph
    # The modules below the model (conv1, layer1-4, fc) and the head's sub-modules (its reduce conv and
    # re-weighting stages; its own second-order ops are never quantized), each counted by its nodes.
    groups: dict[str, int] = {}
    weighted: set[str] = set()
    for node in graph.node:
        path = module_path(node)
        if len(path) > 2 and path[1] == "model.head" and path[2].startswith("model.head."):
            if path[2] == "model.head.vectorize":  # second-order: never quantized
                continue
            group = path[2]
        elif len(path) > 1 and path[1].startswith("model.") and path[1] != "model.head":
            group = path[1]
        else:
            continue
        groups[group] = groups.get(group, 0) + 1
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            weighted.add(group)
    groups = {g: n for g, n in groups.items() if g in weighted}  # a ReLU or a pool alone quantizes nothing
    reference = probabilities(fp32, val_x)
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    rows = []
    for group, count in groups.items():
        out = work / f"only_{group}.onnx"
        with stage(f"sensitivity: only {group} quantized ({count} nodes)"):
            keep = tuple(g for g in groups if g != group)
            quantize_int8(fp32, out, calibration, work, fp32_modules=keep, calibration_options={})
            probs = probabilities(out, val_x)
        differ = probs.argmax(1) != reference.argmax(1)
        rows.append(
            {
                "group": group,
                "nodes": count,
                "top1_changes": int(differ.sum()),
                "max_abs_diff_probability": float(np.abs(probs - reference).max()),
                "fp32_margins_where_changed": [round(float(m), 3) for m in margin[differ]],
            }
        )
        row = rows[-1]
        log(f"   {group}: {row['top1_changes']} top-1 changes, max |Δp| {row['max_abs_diff_probability']:.3g}")
    table = [
        [r["group"], r["nodes"], r["top1_changes"], f"{r['max_abs_diff_probability']:.3g}",
         ", ".join(f"{m:.3f}" for m in r["fp32_margins_where_changed"]) or "none"]
        for r in rows
    ]  # fmt: skip
    markdown = "### INT8 sensitivity: one module quantized at a time\n\n" + md_table(
        ["module", "nodes", "top-1 changes vs fp32", "max |Δp|", "fp32 margins where changed"], table
    )
    return rows, markdown


def run(
    settings: Settings, work: Path, sensitivity: bool = False, bit_widths: bool = False
) -> tuple[dict[str, Any], str]:
    from bench import low_precision

    both = not (sensitivity or bit_widths)
    kept: dict[str, Any] = {}
    data, markdown = low_precision.run(settings, work, keep=kept)
    if sensitivity or both:
        data["sensitivity"], more = sensitivity(kept["fp32"], kept["calibration"], kept["val_x"], work)
        markdown += "\n" + more + "\n"
    if bit_widths or both:
        probs = kept["probs"]
        compare = {
            "bf16 autocast (PyTorch)": probs["eager_bf16"],
            "the INT8 model (onnxruntime kernels)": probs["onnxruntime_int8"],
        }
        # quantize_int8 left the fp32 model it quantized in the work folder.
        prepared = work / "int8_prepared.onnx"
        data["bit_widths"], more = study(
            kept["int8"], prepared, kept["val_x"], probs["onnxruntime_fp32"], work, compare
        )
        markdown += "\n" + more + "\n"
    return data, markdown


def main() -> int:
    return run_part(
        "int8",
        __doc__,
        run,
        sensitivity={"action": "store_true", "help": "quantize one module at a time"},
        bit_widths={"action": "store_true", "help": "re-run the INT8 graph at other bit widths"},
    )


if __name__ == "__main__":
    entry(main)
