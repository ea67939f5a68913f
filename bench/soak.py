"""Soak: open-loop Poisson arrivals held at 0.7x the measured capacity for minutes, per minute what was
answered, refused, p50/p99 and the resident memory of the server's whole process tree.

What a short benchmark cannot show: latency that drifts, a queue that slowly fills, memory that grows.
Two servers run side by side, the shipped queue policy and the same with the queue timeout off, each
taking half the load at the same time (two concurrent open loops at 0.35x capacity each), so that outside
load on a shared machine hits both alike. Capacity is measured first on the first server alone (closed
loop, gRPC, uint8 tensors, concurrency 4, the shipped settings).

    .venv/bin/python bench/soak.py [--quick] [--minutes N]

Targets: nothing refused, the last minute's p99 within 1.5x the second minute's, and memory growth
under 64 MB after the first (warm-up) minute.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import Settings, entry, fp32_onnx, images, load_average, log, md_table, num, run_part, stage
from bench.load import brief, server_rss_mb
from bench.serving import load, make_repository, triton

LOAD_LEVEL = 0.7  # of capacity, split evenly between the variants running side by side
MINUTES = 3  # the default in `make bench`: enough for a second and a last minute; long runs: --minutes 60
QUICK_MINUTES = 2
QUICK_WINDOW_S = 20.0  # --quick: "minutes" of 20 s, a smoke run
CLIENT_TIMEOUT_S = 30.0
P99_DRIFT_MAX = 1.5  # last minute's p99 / second minute's
RSS_GROWTH_MAX_MB = 64.0
VARIANTS = {"queue policy (shipped)": {}, "queue timeout off": {"queue_timeout_ms": 0}}


def run(
    settings: Settings, work: Path, onnx_path: Path | None = None, args: argparse.Namespace | None = None
) -> tuple[dict[str, Any], str]:
    onnx_path = fp32_onnx(settings, work, onnx_path)
    minutes = getattr(args, "minutes", None) or (QUICK_MINUTES if settings.quick else MINUTES)
    window = QUICK_WINDOW_S if settings.quick else 60.0
    tensors = images(64, settings.crop, seed=7)
    with contextlib.ExitStack() as stack:
        servers = {}
        for i, (variant, overrides) in enumerate(VARIANTS.items()):
            repo = make_repository(onnx_path, settings, work / f"soak-{i}", overrides)
            servers[variant] = stack.enter_context(triton(repo))
        loads = {v: load(s, "grpc", "tensor", tensors, [], timeout=CLIENT_TIMEOUT_S) for v, s in servers.items()}
        first = next(iter(VARIANTS))
        with stage("capacity: closed loop, concurrency 4 (first server alone)"):
            # A refusal here (the machine starved by something else) lowers capacity; it must not end the run.
            capacity = loads[first].closed(4, seconds=2.0 if settings.quick else 15.0, check=False)["images_per_s"]
        rate = LOAD_LEVEL * capacity / len(VARIANTS)
        log(f"   capacity {capacity:.1f} requests/s; {rate:.2f} requests/s to each of {len(VARIANTS)} servers")
        rows: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for minute in range(1, minutes + 1):
            results: dict[str, dict[str, Any]] = {}

            def one(variant: str, k: int, minute: int = minute, results: dict = results) -> None:
                results[variant] = loads[variant].open(rate, window, seed=1000 * minute + k)  # arrivals of their own

            threads = [threading.Thread(target=one, args=(v, k)) for k, v in enumerate(VARIANTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for variant, server in servers.items():
                row = brief(results[variant]) | {
                    "minute": minute,
                    "rss_mb": server_rss_mb(server.process.pid),
                    "ready": server.is_ready(),
                    "load_average": load_average(),
                    "at": time.strftime("%H:%M:%S", time.gmtime()),
                }
                rows[variant].append(row)
                log(f"   minute {minute} {variant}: {row['answered']} answered, {row['refused']} refused, "
                    f"{row['failed']} failed, p50 {num(row['p50_ms'])} ms, p99 {num(row['p99_ms'])} ms, "
                    f"RSS {row['rss_mb']:.0f} MB, load {row['load_average']}")  # fmt: skip
    verdicts = {v: verdict(r) for v, r in rows.items()}
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
            + md_table(
                "minute | ended (UTC) | offered req/s | answered | refused | failed | p50 ms | p99 ms | server RSS MB",
                table,
            )
            + f"\n\nRefused {v['refused']}, failed {v['failed']}; p99 last / second minute "
            f"{num(v['p99_drift'], '.2f')} (target <= {P99_DRIFT_MAX}); memory growth after minute 1 "
            f"{num(v['rss_growth_mb'], '.0f')} MB (target < {RSS_GROWTH_MAX_MB:.0f}): "
            f"{'met' if v['met'] else 'NOT met'}.\n"
        )
    markdown = (
        f"### Soak: open-loop Poisson arrivals at {LOAD_LEVEL}x capacity for {minutes} x {window:.0f} s "
        f"({settings.arch}, {settings.crop}x{settings.crop}, gRPC uint8 tensors)\n\n"
        f"Capacity (closed loop, concurrency 4): {capacity:.1f} requests/s. The two servers ran at the same time, "
        f"{rate:.2f} requests/s each (together {LOAD_LEVEL}x capacity). Client timeout {CLIENT_TIMEOUT_S:.0f} s.\n\n"
        + "\n".join(tables)
    )
    data = {"capacity_per_s": capacity, "rate_per_server": rate, "window_s": window, "minutes": minutes,
            "rows": rows, "verdicts": verdicts}  # fmt: skip
    return data, markdown


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The soak's targets on one variant's minutes."""
    refused, failed = sum(r["refused"] for r in rows), sum(r["failed"] for r in rows)
    second, last = (rows[1]["p99_ms"], rows[-1]["p99_ms"]) if len(rows) > 1 else (None, None)
    drift = last / second if second and last else None
    growth = rows[-1]["rss_mb"] - rows[0]["rss_mb"] if len(rows) > 1 else None
    met = (not refused and not failed and drift is not None and drift <= P99_DRIFT_MAX
           and growth is not None and growth < RSS_GROWTH_MAX_MB)  # fmt: skip
    return {"refused": refused, "failed": failed, "p99_drift": drift, "rss_growth_mb": growth, "met": met}


def flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=int, help=f"how long (default {MINUTES}; {QUICK_MINUTES} short ones with --quick)")


def main() -> int:
    return run_part("soak", __doc__, lambda settings, work, args: run(settings, work, None, args), flags)


if __name__ == "__main__":
    entry(main)
