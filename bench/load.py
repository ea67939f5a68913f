"""The one load generator: closed loop at a concurrency or open loop at a Poisson rate, against any
model on a Triton server, with any payload, over gRPC or HTTP (open loop: gRPC).

Every run returns the same record: what was sent, answered, refused by admission control (counted
apart from other failures: a refusal is the server protecting itself, not a fault), latency
percentiles of the answers, throughput, the CPU the client (and, given its pid, the server) used,
and the server's own view over the measured window from Triton's statistics API (requests, time
queued vs computing per request, the batch sizes it ran). Windows of one configuration can be
pooled with :func:`combine`.

Statistics are a control-plane call: pass the operators' key as ``headers`` (see
:func:`control_headers`); inference calls never carry it.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import percentile
from client.inference import OVERLOAD_MESSAGES

PERCENTILES = {"p50_ms": 50, "p90_ms": 90, "p99_ms": 99, "p999_ms": 99.9}


def control_headers(server: Any, protocol: str = "grpc") -> dict[str, str] | None:
    """The key a server's statistics ask for, if it has one (HTTP headers or gRPC metadata)."""
    return getattr(server, "grpc_control_headers" if protocol == "grpc" else "control_headers", None)


class Load:
    """One-image requests to ``model`` at ``url``, cycling through ``items``: uint8 arrays (each sent as a
    batch of one, input ``image``) or encoded files (input ``image_bytes``).

    ``stats_model`` is whose statistics to report (default ``model``; for an ensemble, the model inside
    whose batching matters). Every request gives up after ``timeout`` seconds, so a run that meets a hung
    server still ends, with the request counted as failed."""

    def __init__(
        self,
        url: str,
        model: str,
        items: Sequence[np.ndarray] | Sequence[bytes],
        protocol: str = "grpc",
        outputs: Sequence[str] = ("probabilities",),
        headers: dict[str, str] | None = None,
        stats_model: str | None = None,
        input_name: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.url, self.model, self.items, self.protocol = url, model, items, protocol
        self.module = grpcclient if protocol == "grpc" else httpclient
        self.output_names, self.headers, self.stats_model = tuple(outputs), headers, stats_model or model
        self.encoded = isinstance(items[0], bytes)
        self.input_name = input_name or ("image_bytes" if self.encoded else "image")
        self.timeout = timeout

    def client(self) -> Any:
        if self.protocol == "grpc":
            return self.module.InferenceServerClient(self.url)
        return self.module.InferenceServerClient(self.url, network_timeout=self.timeout)

    def inputs(self, i: int) -> list[Any]:
        from tritonclient.utils import np_to_triton_dtype

        item = self.items[i % len(self.items)]
        x = np.array([item], dtype=object).reshape(1, 1) if self.encoded else np.asarray(item)[None]
        inp = self.module.InferInput(
            self.input_name, list(x.shape), "BYTES" if self.encoded else np_to_triton_dtype(x.dtype)
        )
        inp.set_data_from_numpy(x)
        return [inp]

    def outputs(self) -> list[Any]:
        return [self.module.InferRequestedOutput(name) for name in self.output_names]

    def send(self, client: Any, i: int) -> Any:
        deadline = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}  # HTTP: network_timeout
        return client.infer(self.model, self.inputs(i), outputs=self.outputs(), **deadline)

    def counters(self, client: Any) -> Counter:
        """Triton's cumulative statistics for ``stats_model``, as flat counters (all versions summed)."""
        if self.protocol == "grpc":
            stats = client.get_inference_statistics(self.stats_model, headers=self.headers, as_json=True)
        else:
            stats = client.get_inference_statistics(self.stats_model, headers=self.headers)
        out: Counter = Counter()
        for m in stats.get("model_stats", []):
            s = m.get("inference_stats", {})
            out["requests"] += int(s.get("success", {}).get("count", 0))
            out["inferences"] += int(m.get("inference_count", 0))
            out["executions"] += int(m.get("execution_count", 0))
            out["queue_ns"] += int(s.get("queue", {}).get("ns", 0))
            out["compute_ns"] += sum(
                int(s.get(k, {}).get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output")
            )
            for b in m.get("batch_stats", []):
                out[f"batch_{b['batch_size']}"] += int(b.get("compute_infer", {}).get("count", 0))
        return out

    def closed(
        self, concurrency: int, seconds: float, warmup: float = 1.0, server_pid: int | None = None, check: bool = True
    ) -> dict[str, Any]:
        """``concurrency`` threads, each with its own connection, sending back to back; the answers that
        end inside the ``seconds`` after ``warmup`` are measured. ``check``: raise if any request failed."""
        clients = [self.client() for _ in range(concurrency)]
        outcomes: list[list[tuple[float, str | None]]] = [[] for _ in range(concurrency)]
        start = time.perf_counter() + 0.05
        t0, t1 = start + warmup, start + warmup + seconds
        meter = _Meter(self, self.client(), server_pid)  # a connection of its own: HTTP clients are not shared

        def loop(k: int) -> None:
            i = k
            while (begin := time.perf_counter()) < t1:
                error = None
                try:
                    self.send(clients[k], i)
                except Exception as e:  # recorded and counted, the load goes on
                    error = getattr(e, "message", lambda e=e: str(e))() or type(e).__name__
                end = time.perf_counter()
                if t0 <= end <= t1:
                    outcomes[k].append((end - begin, error))
                i += concurrency

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(concurrency)]
        threads.append(threading.Thread(target=meter.window, args=(t0, t1)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in (*clients, meter.client):
            c.close()
        result = summarize([o for per in outcomes for o in per], seconds, **meter.readings)
        if check and (result["refused"] or result["failed"]):
            raise RuntimeError(
                f"{result['refused'] + result['failed']} failed requests, first: {result['failures'][0]}"
            )
        return result

    def open(self, rate: float, seconds: float, seed: int = 0, server_pid: int | None = None) -> dict[str, Any]:
        """Requests at Poisson times (mean ``rate``/s) for ``seconds``, whatever the server does; then wait for
        every answer (bounded: the timeout and 10 s). gRPC only."""
        if self.protocol != "grpc":
            raise ValueError("the open loop sends through gRPC's asynchronous client")
        client = self.client()
        arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, size=int(rate * seconds * 2) + 10))
        arrivals = arrivals[arrivals < seconds]
        outcomes: list[tuple[float, str | None]] = []
        lock, pending = threading.Lock(), threading.Semaphore(0)
        inputs, outputs = self.inputs(0), self.outputs()
        meter = _Meter(self, client, server_pid)
        meter.read("before")
        start = time.perf_counter()
        for at in arrivals:
            time.sleep(max(0.0, start + at - time.perf_counter()))

            def done(result: Any, error: Any, sent: float = time.perf_counter()) -> None:  # both passed by name
                with lock:
                    outcomes.append((time.perf_counter() - sent, None if error is None else error.message()))
                pending.release()

            client.async_infer(self.model, inputs, done, outputs=outputs, client_timeout=self.timeout)
        deadline = time.perf_counter() + self.timeout + 10
        for _ in arrivals:
            if not pending.acquire(timeout=max(0.0, deadline - time.perf_counter())):
                break  # an answer that never came is counted as a failure below
        meter.read("after")
        client.close()
        with lock:
            outcomes += [(float("nan"), "no answer")] * (len(arrivals) - len(outcomes))
        return {"offered_per_s": len(arrivals) / seconds, **summarize(outcomes, seconds, **meter.readings)}


class _Meter:
    """Client and server CPU time and Triton's counters at the edges of a measured window."""

    def __init__(self, load: Load, client: Any, server_pid: int | None) -> None:
        self.load, self.client, self.server_pid = load, client, server_pid
        self.marks: dict[str, tuple[float, float, Counter | None]] = {}

    def read(self, mark: str) -> None:
        own = resource.getrusage(resource.RUSAGE_SELF)
        server = server_cpu_s(self.server_pid) if self.server_pid else 0.0
        try:
            stats = self.load.counters(self.client)
        except Exception:  # statistics refused (no key) or unsupported: the load's own figures still stand
            stats = None
        self.marks[mark] = (own.ru_utime + own.ru_stime, server, stats)

    def window(self, t0: float, t1: float) -> None:
        for mark, at in (("before", t0), ("after", t1)):
            time.sleep(max(0.0, at - time.perf_counter()))
            self.read(mark)

    @property
    def readings(self) -> dict[str, Any]:
        (c0, s0, n0), (c1, s1, n1) = self.marks["before"], self.marks["after"]
        out: dict[str, Any] = {"client_cpu_s": c1 - c0}
        if self.server_pid:
            out["server_cpu_s"] = s1 - s0
        if n0 is not None and n1 is not None:
            out["server_counts"] = dict(n1 - n0)
        return out


def summarize(
    outcomes: Sequence[tuple[float, str | None]],
    seconds: float,
    client_cpu_s: float = 0.0,
    server_cpu_s: float | None = None,
    server_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The record every run returns, from (latency, error or None) per request in the window."""
    answered = [latency for latency, error in outcomes if error is None]
    refused = [
        latency for latency, error in outcomes if error is not None and any(m in error for m in OVERLOAD_MESSAGES)
    ]
    failures = [error for _, error in outcomes if error is not None and not any(m in error for m in OVERLOAD_MESSAGES)]
    out: dict[str, Any] = {
        "sent": len(outcomes),
        "answered": len(answered),
        "refused": len(refused),
        "failed": len(failures),
        "failures": [e for _, e in outcomes if e][:3],  # the first few messages, refusals included
        "seconds": seconds,
        "requests": len(answered),  # answered in the window, the figure throughput is made of
        "images_per_s": len(answered) / seconds,
        **{k: 1e3 * percentile(answered, q) if answered else None for k, q in PERCENTILES.items()},
        "refusal_p99_ms": 1e3 * percentile(refused, 99) if refused else None,
        "refusal_max_ms": 1e3 * max(refused) if refused else None,
        "client_cpu_s": client_cpu_s,
        "outcomes": list(outcomes),
    }
    if server_cpu_s is not None:
        out["window_cpu_s"] = {"client": client_cpu_s, "server": server_cpu_s}
    if server_counts is not None:
        out["server"] = server_view(server_counts)
    return out


def server_view(counts: dict[str, int]) -> dict[str, Any]:
    """What Triton saw in the window: mean queue and compute time per request, the batch sizes it ran."""
    requests, executions = counts.get("requests", 0), counts.get("executions", 0)
    return {
        "counts": counts,
        "requests": requests,
        "executions": executions,
        "mean_batch": counts.get("inferences", 0) / executions if executions else float("nan"),
        "queue_ms_per_request": counts.get("queue_ns", 0) / 1e6 / requests if requests else None,
        "compute_ms_per_request": counts.get("compute_ns", 0) / 1e6 / requests if requests else None,
        "batch_sizes": {
            int(k[6:]): v for k, v in sorted(counts.items(), key=lambda kv: kv[0]) if k.startswith("batch_") and v
        },
    }


def combine(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Windows of one configuration pooled into one record (their requests, counters and CPU summed)."""
    counts: Counter = Counter()
    for r in results:
        counts.update(r.get("server", {}).get("counts", {}))
    return summarize(
        [o for r in results for o in r["outcomes"]],
        sum(r["seconds"] for r in results),
        client_cpu_s=sum(r["client_cpu_s"] for r in results),
        server_cpu_s=sum(r["window_cpu_s"]["server"] for r in results) if "window_cpu_s" in results[0] else None,
        server_counts=dict(counts) if "server" in results[0] else None,
    )


def brief(result: dict[str, Any]) -> dict[str, Any]:
    """The record without its per-request outcomes (for JSON files)."""
    return {k: v for k, v in result.items() if k != "outcomes"}


# -- the server's processes (Triton and its python backend stubs share a process group) -------------


def server_processes(pid: int) -> Iterator[tuple[Path, list[str]]]:
    """Every live process in the server's process group: its /proc folder and its stat fields after the name."""
    for folder in Path("/proc").iterdir():
        if not folder.name.isdigit():
            continue
        try:
            fields = (folder / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if len(fields) > 12 and int(fields[2]) == pid:  # process group id
            yield folder, fields


def server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the server and its stubs have used so far."""
    return sum(int(f[11]) + int(f[12]) for _, f in server_processes(pid)) / os.sysconf("SC_CLK_TCK")


def server_rss_mb(pid: int) -> float:
    """Resident memory of the server and its stubs."""
    total = 0
    for folder, _ in server_processes(pid):
        try:
            total += sum(
                int(ln.split()[1]) for ln in (folder / "status").read_text().splitlines() if ln.startswith("VmRSS:")
            )
        except OSError:
            continue  # gone meanwhile
    return total / 1024
