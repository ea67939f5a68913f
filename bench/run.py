"""The CPU benchmarks (``make bench``): model speed, low precision, serving, overload, realistic payloads, soak. Writes
``bench.md`` (the tables, the machine, docs/performance.md's targets against this run) and ``bench.json``
(every sample), plus a pair per part; ``bench/gpu.py`` and ``bench/studies/`` run on demand.

    .venv/bin/python bench/run.py [--quick] [--parts speed serving ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import low_precision, model_speed, overload, payloads, serving, soak
from bench.common import RESULTS, Settings, entry, load_average, log, machine, machine_markdown, md_table, write

PARTS = {"speed": model_speed, "precision": low_precision, "serving": serving, "overload": overload,
         "payloads": payloads, "soak": soak}  # fmt: skip


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (docs/performance.md) against this run's ratios; "at most X" goals are checked as
    X / measured >= 1."""
    speed = {r["batch"]: r for r in results.get("speed", {}).get("rows", [])}
    batch1, peak = speed.get(min(speed, default=0), {}), speed.get(8, {}).get("onnxruntime_fraction_of_peak")
    served = results.get("serving", {}).get("concurrency_4_fraction", {})
    at2 = results.get("overload", {}).get("policy_at_2x") or {}
    p99, slowest = at2.get("p99_ms"), at2.get("refusal_max_ms")
    photos = results.get("payloads", {})
    checks = [
        ("ONNX vs PyTorch eager at batch 1", batch1.get("onnx_speedup_vs_eager"), 1.3, "{:.2f}x"),
        ("ONNX at batch 8, fraction of the measured fp32 peak", peak, 0.9, "{:.0%}"),
        ("served / in-process at concurrency 4 (grpc tensor)", served.get("grpc_tensor"), 0.9, "{:.0%}"),
        ("served / in-process at concurrency 4 (http tensor)", served.get("http_tensor"), 0.9, "{:.0%}"),
        ("2x overload: goodput of capacity (queue policy)", at2.get("goodput_of_capacity"), 0.9, "{:.0%}"),
        ("2x overload: answered p99 <= 2 s (2 s / p99)", p99 and 2000 / p99, 1.0, "{:.2f}"),
        ("2x overload: every refusal within 2 s (2 s / slowest)", slowest and 2000 / slowest, 1.0, "{:.2f}"),
        ("12 MP JPEG as bytes vs tensors, concurrency 4", photos.get("bytes_vs_tensor", {}).get("12 MP JPEG"), 0.85,
         "{:.2f}x"),
    ]  # fmt: skip
    out = [
        {"target": what, "goal": goal, "measured": value, "met": value is not None and value >= goal,
         "text": "not measured" if value is None else fmt.format(value)}
        for what, value, goal, fmt in checks
    ]  # fmt: skip
    cpu = photos.get("cpu_ratio", {}).get("12 MP JPEG")
    if cpu is not None:  # the throughput ratio if both paths kept every core busy
        out[-1]["text"] += f" (CPU per image, tensor / bytes: {cpu:.2f})"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, few rounds: checks that everything runs")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--out", type=Path, help="default: bench/results (bench/results/quick with --quick)")
    args = p.parse_args(argv)
    settings = Settings.make(args.quick)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    started = time.perf_counter()
    info = machine()
    log(machine_markdown(info))
    results: dict[str, Any] = {}
    sections: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="threegnet-bench-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"  # the fp32 export: made by the first part that needs it, then reused
        for part in args.parts:
            part_start = time.perf_counter()
            log(f"== {part}")
            reuse = [onnx_path] if part not in ("speed", "precision") and onnx_path.is_file() else []  # own models
            try:
                data, md = PARTS[part].run(settings, onnx_path.parent, *reuse)
            except Exception as e:  # one broken part must not hide the others' numbers
                data = {"error": f"{type(e).__name__}: {e}"}
                md = f"### {part}: failed\n\n```\n{traceback.format_exc()}```\n"
                log(traceback.format_exc())
            data["seconds"] = round(time.perf_counter() - part_start, 1)
            results[part] = data
            sections[part] = md
            write(out, PARTS[part].__name__.removeprefix("bench."), {"machine": info, **data}, md)
            log(f"== {part}: {data['seconds']:.0f} s")
    info["load_average_at_end"] = load_average()
    info["seconds"] = round(time.perf_counter() - started, 1)
    checks = targets(results)
    rows = [[t["target"], t["goal"], t["text"], "yes" if t["met"] else "no"] for t in checks]
    title = "## CPU benchmarks" + (" (quick smoke run: a small model, not the real numbers)" if args.quick else "")
    ran = f" Load average at the end {info['load_average_at_end']}; the whole run took {info['seconds'] / 60:.1f} min."
    table = "### Targets\n\n" + md_table(["target", "goal", "measured", "met"], rows)
    markdown = "\n\n".join([title, machine_markdown(info) + ran, table, *sections.values()])
    write(out, "bench", {"machine": info, "quick": args.quick, "targets": checks, **results}, markdown)
    print(markdown)
    log(f"wrote {out / 'bench.md'} and {out / 'bench.json'} in {info['seconds']:.0f} s")
    failed = [part for part, data in results.items() if "error" in data]
    if failed:
        log(f"failed parts: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    entry(main)
