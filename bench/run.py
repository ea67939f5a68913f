"""The CPU benchmarks (``make bench``): model speed, low precision, serving, overload, realistic payloads, soak.

    .venv/bin/python bench/run.py                 # ResNet50-3G at 224
    .venv/bin/python bench/run.py --quick         # a small model on 64x64 crops: a smoke run of every part
    .venv/bin/python bench/run.py --parts speed serving

Writes ``bench.json`` (everything, with the machine's description) and ``bench.md``
(the tables the README and docs/performance.md show) to ``--out`` (default
``bench/results/``, ``bench/results/quick/`` with ``--quick``), plus one JSON and one
markdown file per part. Every figure that matters is a ratio of two things measured
side by side in this run; the targets in docs/performance.md are checked against them.
The GPU harness is separate (``bench/gpu.py``), and so are the finished studies (``bench/studies/``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/run.py` from anywhere

from bench import low_precision, model_speed, overload, payloads, serving, soak
from bench.common import RESULTS, Settings, entry, load_average, log, machine, machine_markdown, md_table, write

PARTS = ("speed", "precision", "serving", "overload", "payloads", "soak")
FILES = {"speed": "model_speed", "precision": "low_precision"}  # result file names, where not the part's


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (docs/performance.md) against this run's ratios."""
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, goal: float, fmt: str) -> None:
        text = fmt.format(value) if value is not None else "not measured"
        out.append({"target": what, "goal": goal, "measured": value, "met": value is not None and value >= goal,
                    "text": text})  # fmt: skip

    speed = results.get("speed", {}).get("rows", [])
    by_batch = {r["batch"]: r for r in speed}
    first, eight = by_batch.get(min(by_batch, default=0)), by_batch.get(8)
    add("ONNX vs PyTorch eager at batch 1", first and first["onnx_speedup_vs_eager"], 1.3, "{:.2f}x")
    peak = eight and eight["onnxruntime_fraction_of_peak"]
    add("ONNX at batch 8, fraction of the measured fp32 peak", peak, 0.9, "{:.0%}")
    precision = results.get("precision", {})
    # INT8 you can trust: the shipped recipe, on enough held-out images to see its rare flips.
    add("INT8 throughput vs fp32 (onnxruntime)", precision.get("int8_speedup"), 2.5, "{:.2f}x")
    add("INT8 accuracy / fp32 accuracy", precision.get("int8_accuracy_ratio"), 0.995, "{:.2%}")
    confident = precision.get("int8_confident_agreement")
    add("INT8 top-1 agreement where fp32's margin >= 0.1", confident, 1.0, "{:.1%}")
    int8_agree, bf16_agree = precision.get("int8_top1_agreement"), precision.get("bf16_top1_agreement")
    out.append({
        "target": "INT8 top-1 agreement with fp32 no worse than bf16 autocast's", "goal": "INT8 >= bf16",
        "measured": int8_agree, "met": int8_agree is not None and bf16_agree is not None and int8_agree >= bf16_agree,
        "text": f"INT8 {int8_agree:.1%}, bf16 {bf16_agree:.1%}" if int8_agree and bf16_agree else "not measured",
    })  # fmt: skip
    fractions = results.get("serving", {}).get("concurrency_4_fraction", {})
    for key in ("grpc_tensor", "http_tensor"):
        add(f"served / in-process at concurrency 4 ({key.replace('_', ' ')})", fractions.get(key), 0.9, "{:.0%}")
    # Open-loop 2x overload with the shipped queue policy. Goals of the form "at most X" are checked as
    # X / measured >= 1.
    at2 = results.get("overload", {}).get("policy_at_2x") or {}
    add("2x overload: goodput of capacity (queue policy)", at2.get("goodput_of_capacity"), 0.8, "{:.0%}")
    p99 = at2.get("p99_ms")
    add("2x overload: answered p99 <= 2 s (2 s / p99)", p99 and 2000 / p99, 1.0, "{:.2f}")
    slowest = at2.get("refusal_max_ms")
    add("2x overload: every refusal within 2 s (2 s / slowest)", slowest and 2000 / slowest, 1.0, "{:.2f}")
    # Camera photos sent as bytes keep up with tensors.
    ratios = results.get("payloads", {}).get("bytes_vs_tensor", {})
    add("12 MP JPEG as bytes vs tensors, concurrency 4", ratios.get("12 MP JPEG"), 0.85, "{:.2f}x")
    cpu = results.get("payloads", {}).get("cpu_ratio", {}).get("12 MP JPEG")
    if cpu is not None:  # the throughput ratio if both paths kept every core busy
        out[-1]["text"] += f" (CPU per image, tensor / bytes: {cpu:.2f})"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, few rounds: checks that everything runs")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = p.parse_args(argv)
    settings = Settings.make(args.quick)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    started = time.perf_counter()
    info = machine()
    log(machine_markdown(info))
    results: dict[str, Any] = {}
    sections: dict[str, str] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="threegnet-bench-") as tmp:
        work = Path(tmp)
        onnx_path: Path | None = None
        for part in args.parts:
            part_start = time.perf_counter()
            log(f"== {part}")
            try:
                if part == "speed":
                    data, md = model_speed.run(settings, work)
                    onnx_path = work / "model.onnx"  # the fp32 export, reused by the parts below
                elif part == "precision":
                    data, md = low_precision.run(settings, work / "precision")
                else:  # a served part, on the same fp32 export
                    data, md = {"serving": serving, "overload": overload, "payloads": payloads, "soak": soak}[part].run(
                        settings, work, onnx_path
                    )
            except Exception as e:  # one broken part must not hide the others' numbers
                failed.append(part)
                data = {"error": f"{type(e).__name__}: {e}"}
                md = f"### {part}: failed\n\n```\n{traceback.format_exc()}```\n"
                log(traceback.format_exc())
            data["seconds"] = round(time.perf_counter() - part_start, 1)
            results[part] = data
            sections[part] = md
            write(out, FILES.get(part, part), {"machine": info, **data}, md)
            log(f"== {part}: {data['seconds']:.0f} s")
    info["load_average_at_end"] = load_average()
    info["seconds"] = round(time.perf_counter() - started, 1)
    checks = targets(results)
    target_table = md_table(
        ["target", "goal", "measured", "met"],
        [[t["target"], t["goal"], t["text"], "yes" if t["met"] else "no"] for t in checks],
    )
    markdown = "\n\n".join(
        [
            "## CPU benchmarks" + (" (quick smoke run: a small model, not the real numbers)" if args.quick else ""),
            machine_markdown(info) + f" Load average at the end {info['load_average_at_end']}; "
            f"the whole run took {info['seconds'] / 60:.1f} min.",
            "### Targets\n\n" + target_table,
            *sections.values(),
        ]
    )
    write(out, "bench", {"machine": info, "quick": args.quick, "targets": checks, **results}, markdown)
    print(markdown)
    log(f"wrote {out / 'bench.md'} and {out / 'bench.json'} in {info['seconds']:.0f} s")
    if failed:
        log(f"failed parts: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    entry(main)
