"""Soak: open-loop Poisson arrivals at 0.7x capacity for minutes on two servers side by side (the shipped queue
policy, the queue timeout off), each with half the cores: per minute answers, refusals, p50/p99 and server
memory, the drift a short run cannot show (docs/performance.md section 9)."""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import Result, Settings, entry, fp32_onnx, images, load_average, log, md_table, num, run_part
from bench.load import Load, brief, capacity, server_rss_mb, triton

LOAD_LEVEL = 0.7  # of each server's capacity on its half of the cores
MINUTES = 3  # the default in `make bench`: enough for a second and a last minute; long runs: --minutes 60
QUICK_MINUTES = 2
QUICK_WINDOW_S = 20.0  # --quick: "minutes" of 20 s, a smoke run
P99_DRIFT_MAX = 1.5  # last minute's p99 / second minute's
RSS_GROWTH_MAX_MB = 64.0
VARIANTS = {"queue policy (shipped)": {}, "queue timeout off": {"queue_timeout_ms": 0}}
# Each server's onnxruntime gets its share of the cores, and capacity is measured on both at once: one server
# alone with every core overstates what each has beside the other (0.7x of it refused and took 4-9 s).
THREADS = max(1, len(os.sched_getaffinity(0)) // len(VARIANTS))


def run(settings: Settings, work: Path, onnx_path: Path | None = None, minutes: int | None = None) -> Result:
    onnx_path = fp32_onnx(settings, work, onnx_path)
    minutes = minutes or (QUICK_MINUTES if settings.quick else MINUTES)
    window = QUICK_WINDOW_S if settings.quick else 60.0
    tensors = list(images(64, settings.crop, seed=7))
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with contextlib.ExitStack() as stack:
        servers: dict[str, Any] = {}
        for i, (variant, overrides) in enumerate(VARIANTS.items()):
            threads = {"intra_op_threads": THREADS, **overrides}
            servers[variant] = stack.enter_context(triton(onnx_path, settings, work / f"soak-{i}", threads))
        loads = {variant: Load(server, tensors) for variant, server in servers.items()}
        with ThreadPoolExecutor(len(VARIANTS)) as pool:  # side by side, as they will run: cores are shared
            capacity_per_s = min(pool.map(lambda load: capacity(load, settings.quick), loads.values()))
        rate = LOAD_LEVEL * capacity_per_s
        log(f"   {rate:.2f} requests/s to each of {len(VARIANTS)} servers")
        for minute in range(1, minutes + 1):
            with ThreadPoolExecutor(len(VARIANTS)) as pool:  # both servers at once, arrivals of their own
                futures = {v: pool.submit(loads[v].open, rate, window, 1000 * minute + k) for k, v in enumerate(loads)}
            for variant, server in servers.items():
                row = brief(futures[variant].result()) | {
                    "minute": minute, "rss_mb": server_rss_mb(server.process.pid), "ready": server.is_ready(),
                    "load_average": load_average(), "at": time.strftime("%H:%M:%S", time.gmtime()),
                }  # fmt: skip
                rows[variant].append(row)
                log(f"   minute {minute} {variant}: {row['answered']} answered, {row['refused']} refused, "
                    f"{row['failed']} failed, p99 {num(row['p99_ms'])} ms, RSS {row['rss_mb']:.0f} MB")  # fmt: skip
    verdicts = {v: verdict(r) for v, r in rows.items()}
    columns = "minute | ended (UTC) | offered req/s | answered | refused | failed | p50 ms | p99 ms | server RSS MB"
    tables = []
    for variant, per_minute in rows.items():
        table = [
            [r["minute"], r["at"], f"{r['offered_per_s']:.2f}", r["answered"], r["refused"], r["failed"],
             num(r["p50_ms"]), num(r["p99_ms"]), f"{r['rss_mb']:.0f}"]
            for r in per_minute
        ]  # fmt: skip
        v = verdicts[variant]
        tables.append(
            f"#### {variant}\n\n"
            + md_table(columns, table)
            + f"\n\nRefused {v['refused']}, failed {v['failed']}; p99 last / second minute "
            f"{num(v['p99_drift'], '.2f')} (target <= {P99_DRIFT_MAX}); memory growth after minute 1 "
            f"{num(v['rss_growth_mb'], '.0f')} MB (target < {RSS_GROWTH_MAX_MB:.0f}): "
            f"{'met' if v['met'] else 'NOT met'}.\n"
        )
    markdown = (
        f"### Soak: open-loop Poisson arrivals at {LOAD_LEVEL}x capacity for {minutes} x {window:.0f} s "
        f"({settings.arch}, {settings.crop}x{settings.crop}, gRPC uint8 tensors)\n\n"
        f"Capacity of a server with {THREADS} onnxruntime thread(s), both measured at once (closed loop, "
        f"concurrency 4 each; the lower): {capacity_per_s:.1f} requests/s. Then both ran at the same time, "
        f"{rate:.2f} requests/s each. "
        f"Client timeout {loads[next(iter(VARIANTS))].timeout:.0f} s.\n\n" + "\n".join(tables)
    )
    data = {"capacity_per_s": capacity_per_s, "rate_per_server": rate, "window_s": window, "minutes": minutes,
            "rows": rows, "verdicts": verdicts}  # fmt: skip
    return data, markdown


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The soak's targets on one variant's minutes: nothing refused or failed, the last minute's p99 within
    ``P99_DRIFT_MAX`` times the second's, memory growth after the first (warm-up) minute under 64 MB."""
    refused, failed = sum(r["refused"] for r in rows), sum(r["failed"] for r in rows)
    second, last = (rows[1]["p99_ms"], rows[-1]["p99_ms"]) if len(rows) > 1 else (None, None)
    drift = last / second if second and last else None
    growth = rows[-1]["rss_mb"] - rows[0]["rss_mb"] if len(rows) > 1 else None
    met = (not refused and not failed and drift is not None and drift <= P99_DRIFT_MAX
           and growth is not None and growth < RSS_GROWTH_MAX_MB)  # fmt: skip
    return {"refused": refused, "failed": failed, "p99_drift": drift, "rss_growth_mb": growth, "met": met}


if __name__ == "__main__":
    minutes = {"type": int, "help": f"how long (default {MINUTES}; {QUICK_MINUTES} short ones with --quick)"}
    entry(lambda: run_part("soak", __doc__, run, minutes=minutes))
