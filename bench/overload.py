"""Overload: open-loop Poisson arrivals from 0.5x to 3x the served capacity, with and without the admission
control the export writes into ``config.pbtxt``: goodput within the SLO, refusals, readiness and memory
(docs/performance.md section 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import Result, Settings, entry, fp32_onnx, images, log, md_table, num, run_part, stage
from bench.load import Load, brief, capacity, server_rss_mb, triton

LEVELS = (0.5, 1.0, 1.5, 2.0, 3.0)
QUICK_LEVELS = (0.5, 2.0)
SLO_S = 2.0  # a later answer counts as answered, not as goodput (the p99 target in docs/performance.md)
VARIANTS = {"queue policy (shipped)": {}, "no queue policy": {"queue_timeout_ms": 0, "max_queue_size": 0}}


def run(settings: Settings, work: Path, onnx_path: Path | None = None) -> Result:
    onnx_path = fp32_onnx(settings, work, onnx_path)
    seconds = 3.0 if settings.quick else 30.0
    tensors = list(images(64, settings.crop, seed=5))
    rows: list[dict[str, Any]] = []
    rate = 0.0
    for i, (variant, overrides) in enumerate(VARIANTS.items()):
        with triton(onnx_path, settings, work / f"overload-{i}", overrides) as server:
            requests = Load(server, tensors)
            rate = rate or capacity(requests, settings.quick)  # measured once, with the shipped settings
            for level in QUICK_LEVELS if settings.quick else LEVELS:
                with stage(f"{variant}: {level}x capacity ({level * rate:.1f} req/s) for {seconds:.0f} s"):
                    rss_before = server_rss_mb(server.process.pid)
                    row = requests.open(level * rate, seconds, seed=int(10 * level))
                    goodput = sum(lat <= SLO_S for lat, error in row["outcomes"] if error is None) / seconds
                    row = brief(row) | {
                        "variant": variant, "level": level, "goodput_per_s": goodput,
                        "goodput_of_capacity": goodput / rate, "ready_after": server.is_ready(),
                        "rss_mb_before": rss_before, "rss_mb_after": server_rss_mb(server.process.pid),
                    }  # fmt: skip
                rows.append(row)
                log(f"   goodput {goodput:.1f}/s, refused {row['refused']}, p99 {num(row['p99_ms'])} ms")
    table = [
        [r["variant"], f"{r['level']}x", f"{r['offered_per_s']:.1f}",
         f"{r['goodput_per_s']:.1f} ({100 * r['goodput_of_capacity']:.0f}%)", f"{r['images_per_s']:.1f}",
         f"{r['refused']} of {r['sent']}", num(r["refusal_max_ms"]), r["failed"], num(r["p50_ms"]), num(r["p99_ms"]),
         "yes" if r["ready_after"] else "no", f"{r['rss_mb_before']:.0f} -> {r['rss_mb_after']:.0f}"]
        for r in rows
    ]  # fmt: skip
    markdown = (
        f"### Overload: open-loop Poisson arrivals, {seconds:.0f} s per level ({settings.arch}, "
        f"{settings.crop}x{settings.crop}, gRPC uint8 tensors)\n\n"
        f"Capacity (closed loop, concurrency 4): {rate:.1f} requests/s. Client timeout {requests.timeout:.0f} s "
        "(a request the server had not answered by then counts under 'other failures').\n\n"
        + md_table(
            f"variant | load | offered req/s | goodput: answers <= {SLO_S:.0f} s per s (of capacity) | "
            "all answers per s | refused | slowest refusal ms | other failures | p50 ms | p99 ms | ready after | "
            "server RSS MB",
            table,
        )
    )
    shipped = next(iter(VARIANTS))
    at2 = next((r for r in rows if r["variant"] == shipped and r["level"] == 2.0), None)
    return {"capacity_per_s": rate, "seconds_per_level": seconds, "rows": rows, "policy_at_2x": at2}, markdown


if __name__ == "__main__":
    entry(lambda: run_part("overload", __doc__, run))
