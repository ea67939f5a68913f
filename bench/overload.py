"""Overload: open-loop Poisson arrivals from 0.5x to 3x the served capacity, with and without
the admission control that ``export/to_onnx.py`` writes into ``config.pbtxt``.

Capacity is measured first (closed loop, gRPC, uint8 tensors, concurrency 4, the shipped
settings). Then, for each variant (the shipped queue policy; no policy: Triton's unbounded
queue) one server runs every load level in turn: requests arrive at Poisson times whatever
the server does (as real users do: nobody waits for the previous user), each with a client
timeout of 30 s. Per level: goodput (answers within the 2 s SLO per second), all answers,
refusals and how fast they came, other failures, p50/p99 of the answered requests, whether
the server stayed ready, and the server's memory (all its processes) before and after.

    .venv/bin/python bench/overload.py [--quick]
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    Settings,
    build_serving,
    entry,
    export,
    images,
    log,
    md_table,
    percentile,
    run_part,
    stage,
)
from bench.serving import MODEL, Requests, closed_loop, make_repository, server_processes
from client.inference import OVERLOAD_MESSAGES

LEVELS = (0.5, 1.0, 1.5, 2.0, 3.0)
QUICK_LEVELS = (0.5, 2.0)
CLIENT_TIMEOUT_S = 30.0
SLO_S = 2.0  # an answer later than this counts as answered, not as goodput (issue 12's p99 target)
VARIANTS = {"queue policy (shipped)": {}, "no queue policy": {"queue_timeout_ms": 0, "max_queue_size": 0}}


def server_rss_mb(pid: int) -> float:
    """Resident memory of the server and every process in its group (the python backend stubs)."""
    total = 0
    for folder, _ in server_processes(pid):
        try:
            total += sum(int(line.split()[1]) for line in (folder / "status").read_text().splitlines()
                         if line.startswith("VmRSS:"))  # fmt: skip
        except OSError:
            continue  # gone meanwhile
    return total / 1024


def open_loop(requests: Requests, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Send at Poisson times (mean ``rate``/s) for ``seconds``; wait for every answer (or the
    client timeout); classify the outcomes."""
    client = requests.client()
    rng = np.random.default_rng(seed)
    outcomes: list[tuple[float, float, str | None]] = []  # (sent, done, error)
    lock = threading.Lock()
    pending = threading.Semaphore(0)
    start = time.perf_counter()
    arrivals = np.cumsum(rng.exponential(1 / rate, size=int(rate * seconds * 2) + 10))
    arrivals = arrivals[arrivals < seconds]
    inputs, outputs = requests.inputs(0), requests.outputs()

    for at in arrivals:
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()

        def done(result: Any, error: Any, sent: float = sent) -> None:  # tritonclient passes both by name
            with lock:
                outcomes.append((sent, time.perf_counter(), None if error is None else error.message()))
            pending.release()

        client.async_infer(MODEL, inputs, done, outputs=outputs, client_timeout=CLIENT_TIMEOUT_S)
    deadline = time.perf_counter() + CLIENT_TIMEOUT_S + 10
    for _ in arrivals:
        if not pending.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            break  # every request has a client timeout: an answer that never comes is counted below
    client.close()
    with lock:
        outcomes += [(0.0, 0.0, "no answer")] * (len(arrivals) - len(outcomes))
    answered = [d - s for s, d, e in outcomes if e is None]
    refused = [d - s for s, d, e in outcomes if e is not None and any(m in e for m in OVERLOAD_MESSAGES)]
    other = [e for _, _, e in outcomes if e is not None and not any(m in e for m in OVERLOAD_MESSAGES)]
    return {
        "offered_per_s": len(arrivals) / seconds,
        "sent": len(arrivals),
        "answered": len(answered),
        "answered_per_s": len(answered) / seconds,
        "goodput_per_s": sum(latency <= SLO_S for latency in answered) / seconds,
        "refused": len(refused),
        "refusal_p99_ms": 1e3 * percentile(refused, 99) if refused else None,
        "refusal_max_ms": 1e3 * max(refused) if refused else None,
        "other_failures": len(other),
        "other_failure_example": other[0] if other else None,
        "p50_ms": 1e3 * percentile(answered, 50) if answered else None,
        "p99_ms": 1e3 * percentile(answered, 99) if answered else None,
    }


def run(settings: Settings, work: Path, onnx_path: Path | None = None) -> tuple[dict[str, Any], str]:
    from serve.server import TritonServer, free_port

    if onnx_path is None:
        serving, _ = build_serving(settings)
        onnx_path = export(serving, work / "model.onnx", settings.crop)
        del serving
    seconds = 3.0 if settings.quick else 30.0
    levels = QUICK_LEVELS if settings.quick else LEVELS
    tensors = images(64, settings.crop, seed=5)
    rows: list[dict[str, Any]] = []
    capacity = None
    for variant, overrides in VARIANTS.items():
        repo = make_repository(onnx_path, settings, work / f"overload-{len(rows)}", overrides)
        server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                              exit_timeout=3, poll_secs=0)  # fmt: skip
        with server:
            requests = Requests("grpc", "tensor", tensors, [], server.grpc_url)
            if capacity is None:
                with stage("capacity: closed loop, concurrency 4"):
                    capacity = closed_loop(requests, 4, seconds=2.0 if settings.quick else 15.0, warmup=1.0)[
                        "images_per_s"
                    ]
                log(f"   capacity {capacity:.1f} requests/s")
            for level in levels:
                with stage(f"{variant}: {level}x capacity ({level * capacity:.1f} req/s) for {seconds:.0f} s"):
                    rss_before = server_rss_mb(server.process.pid)
                    row = open_loop(requests, level * capacity, seconds, seed=int(10 * level))
                    row.update(
                        variant=variant,
                        level=level,
                        goodput_of_capacity=row["goodput_per_s"] / capacity,
                        ready_after=server.is_ready(),
                        rss_mb_before=rss_before,
                        rss_mb_after=server_rss_mb(server.process.pid),
                    )
                rows.append(row)
                log(
                    f"   goodput {row['goodput_per_s']:.1f}/s, refused {row['refused']}, "
                    f"p99 {row['p99_ms'] or 0:.0f} ms"
                )

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    table = [
        [
            r["variant"],
            f"{r['level']}x",
            f"{r['offered_per_s']:.1f}",
            f"{r['goodput_per_s']:.1f} ({100 * r['goodput_of_capacity']:.0f}%)",
            f"{r['answered_per_s']:.1f}",
            f"{r['refused']} of {r['sent']}",
            ms(r["refusal_max_ms"]),
            r["other_failures"],
            ms(r["p50_ms"]),
            ms(r["p99_ms"]),
            "yes" if r["ready_after"] else "no",
            f"{r['rss_mb_before']:.0f} -> {r['rss_mb_after']:.0f}",
        ]
        for r in rows
    ]
    markdown = (
        f"### Overload: open-loop Poisson arrivals, {seconds:.0f} s per level ({settings.arch}, "
        f"{settings.crop}x{settings.crop}, gRPC uint8 tensors)\n\n"
        f"Capacity (closed loop, concurrency 4): {capacity:.1f} requests/s. Client timeout {CLIENT_TIMEOUT_S:.0f} s "
        "(a request the server had not answered by then counts under 'other failures').\n\n"
        + md_table(
            [
                "variant",
                "load",
                "offered req/s",
                f"goodput: answers <= {SLO_S:.0f} s per s (of capacity)",
                "all answers per s",
                "refused",
                "slowest refusal ms",
                "other failures",
                "p50 ms",
                "p99 ms",
                "ready after",
                "server RSS MB",
            ],
            table,
        )
    )
    at2 = next((r for r in rows if r["variant"] == next(iter(VARIANTS)) and r["level"] == 2.0), None)
    return {"capacity_per_s": capacity, "seconds_per_level": seconds, "rows": rows, "policy_at_2x": at2}, markdown


def main() -> int:
    return run_part("overload", __doc__, run)


if __name__ == "__main__":
    entry(main)
