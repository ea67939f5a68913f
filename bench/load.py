"""The one load generator of the served parts: closed loop at a concurrency or open loop at a Poisson rate,
one image per request, gRPC or HTTP, against a Triton server on the repository the export writes; each run
returns answers, refusals, latency percentiles, CPU and Triton's own statistics (/v2/models/stats)."""

from __future__ import annotations

import importlib
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Settings, log, stage
from client.inference import OVERLOAD_MESSAGES

MODEL = "threegnet"  # the ONNX model; "threegnet_image" is the ensemble that decodes files first
PERCENTILES = {"p50_ms": 50, "p90_ms": 90, "p99_ms": 99, "p999_ms": 99.9}
Reading = tuple[float, float, Counter | None]  # client CPU s, server CPU s, Triton's counters (None: refused)


def triton(onnx_path: Path, settings: Settings, repo: Path, overrides: dict[str, Any] | None = None) -> Any:
    """A Triton server (a context manager) on the repository ``export/to_onnx.py`` writes, ``overrides``
    changing :class:`~export.triton_config.ModelSpec`'s serving fields."""
    from export.repository import write_repository
    from export.triton_config import ModelSpec
    from serve.server import TritonServer
    from threegnet_preprocessing import Preprocessing

    pp = Preprocessing(resize=settings.resize, crop=settings.crop).to_dict()
    parameters = {"arch": settings.arch, "num_classes": settings.num_classes, "preprocessing": pp}
    weight_map = (settings.crop // 16,) * 2
    spec = ModelSpec(MODEL, settings.num_classes, settings.crop, weight_map, parameters, **(overrides or {}))
    write_repository(repo, spec, onnx_path, [f"class_{i}" for i in range(settings.num_classes)], pp, 1)
    return TritonServer.on_free_ports(repo, exit_timeout=3, poll_secs=0)  # the repository does not change


class Load:
    """One-image requests to ``server``, cycling through ``items``: uint8 arrays to ``threegnet``, encoded files
    to the ensemble ``threegnet_image``; statistics are the ONNX model's either way. A request gives up after
    ``timeout`` seconds (counted as failed), so a run that meets a hung server still ends."""

    def __init__(self, server: Any, items: Sequence[Any], protocol: str = "grpc", timeout: float = 30.0) -> None:
        self.items, self.protocol, self.timeout = items, protocol, timeout
        self.encoded = isinstance(items[0], bytes)
        self.model = f"{MODEL}_image" if self.encoded else MODEL
        self.server_pid = server.process.pid  # also the process group of its backend stubs
        self.module = importlib.import_module(f"tritonclient.{protocol}")
        grpc = protocol == "grpc"
        self.url = server.grpc_url if grpc else server.http_url
        self.headers = server.grpc_control_headers if grpc else server.control_headers
        self.outputs = [self.module.InferRequestedOutput("probabilities")]

    def client(self) -> Any:
        timeout = {} if self.protocol == "grpc" else {"network_timeout": self.timeout}  # gRPC: per request
        return self.module.InferenceServerClient(self.url, **timeout)

    def inputs(self, i: int) -> list[Any]:
        item = self.items[i % len(self.items)]
        if self.encoded:
            inp = self.module.InferInput("image_bytes", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([item], dtype=object).reshape(1, 1))
        else:
            inp = self.module.InferInput("image", [1, *np.shape(item)], "UINT8")
            inp.set_data_from_numpy(np.asarray(item, dtype=np.uint8)[None])
        return [inp]

    def send(self, client: Any, i: int) -> Any:
        deadline = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}  # HTTP: network_timeout
        return client.infer(self.model, self.inputs(i), outputs=self.outputs, **deadline)

    def counters(self, client: Any) -> Counter:
        """Triton's cumulative statistics for the ONNX model, as flat counters (all versions summed)."""
        json_flag = {"as_json": True} if self.protocol == "grpc" else {}
        stats = client.get_inference_statistics(MODEL, headers=self.headers, **json_flag)
        out: Counter = Counter()
        for m in stats.get("model_stats", []):
            s = m.get("inference_stats", {})
            out["requests"] += int(s.get("success", {}).get("count", 0))
            out["inferences"] += int(m.get("inference_count", 0))
            out["executions"] += int(m.get("execution_count", 0))
            out["queue_ns"] += int(s.get("queue", {}).get("ns", 0))
            for stage_name in ("compute_input", "compute_infer", "compute_output"):
                out["compute_ns"] += int(s.get(stage_name, {}).get("ns", 0))
            for b in m.get("batch_stats", []):
                out[f"batch_{b['batch_size']}"] += int(b.get("compute_infer", {}).get("count", 0))
        return out

    def reading(self, client: Any) -> Reading:
        """Client and server (with its stubs) CPU seconds so far, and Triton's counters (None where refused)."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        try:
            stats = self.counters(client)
        except Exception:  # the load's own figures still stand
            stats = None
        server = sum(int(f[11]) + int(f[12]) for f in server_processes(self.server_pid)) / os.sysconf("SC_CLK_TCK")
        return own.ru_utime + own.ru_stime, server, stats

    def closed(self, concurrency: int, seconds: float, warmup: float = 1.0, check: bool = True) -> dict[str, Any]:
        """``concurrency`` connections sending back to back; the answers that end in the ``seconds`` after
        ``warmup`` are measured. ``check``: raise if any request failed."""
        clients = [self.client() for _ in range(concurrency + 1)]  # the last reads statistics: HTTP's aren't shared
        outcomes: list[tuple[float, str | None]] = []
        marks: list[Reading] = []
        t0 = time.perf_counter() + 0.05 + warmup
        t1 = t0 + seconds

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
                    outcomes.append((end - begin, error))
                i += concurrency

        def meter() -> None:
            for at in (t0, t1):
                time.sleep(max(0.0, at - time.perf_counter()))
                marks.append(self.reading(clients[-1]))

        with ThreadPoolExecutor(concurrency + 1) as pool:
            window = pool.submit(meter)
            list(pool.map(loop, range(concurrency)))
            window.result()
        for c in clients:
            c.close()
        result = summarize(outcomes, seconds, *_window(*marks))
        if check and (failed := result["sent"] - result["answered"]):
            raise RuntimeError(f"{failed} failed requests, first: {result['failures'][0]}")
        return result

    def open(self, rate: float, seconds: float, seed: int = 0) -> dict[str, Any]:
        """Requests at Poisson times (mean ``rate``/s) for ``seconds`` whatever the server does, then every answer
        awaited (at most the timeout and 10 s). gRPC: it needs the asynchronous client."""
        if self.protocol != "grpc":
            raise ValueError("the open loop sends through gRPC's asynchronous client")
        client = self.client()
        arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, size=int(rate * seconds * 2) + 10))
        arrivals = arrivals[arrivals < seconds]
        outcomes: list[tuple[float, str | None]] = []
        lock, pending = threading.Lock(), threading.Semaphore(0)
        inputs = self.inputs(0)
        before = self.reading(client)
        start = time.perf_counter()
        for at in arrivals:
            time.sleep(max(0.0, start + at - time.perf_counter()))

            def done(result: Any, error: Any, sent: float = time.perf_counter()) -> None:  # both passed by name
                with lock:
                    outcomes.append((time.perf_counter() - sent, None if error is None else error.message()))
                pending.release()

            client.async_infer(self.model, inputs, done, outputs=self.outputs, client_timeout=self.timeout)
        deadline = time.perf_counter() + self.timeout + 10
        for _ in arrivals:
            if not pending.acquire(timeout=max(0.0, deadline - time.perf_counter())):
                break  # an answer that never came is counted as a failure below
        after = self.reading(client)
        client.close()
        with lock:
            outcomes += [(float("nan"), "no answer")] * (len(arrivals) - len(outcomes))
        return {"offered_per_s": len(arrivals) / seconds, **summarize(outcomes, seconds, *_window(before, after))}


def capacity(load: Load, quick: bool) -> float:
    """Answers per second to a closed loop at concurrency 4, what open loops are scaled to; a refusal here
    (the machine starved by other work) lowers it but does not end the run."""
    with stage("capacity: closed loop, concurrency 4"):
        rate = load.closed(4, seconds=2.0 if quick else 15.0, check=False)["images_per_s"]
    log(f"   capacity {rate:.1f} requests/s")
    return rate


def _window(before: Reading, after: Reading) -> tuple[float, float, dict[str, int] | None]:
    """Client CPU, server CPU and Triton's counters over a window, from readings at its edges."""
    counts = dict(after[2] - before[2]) if before[2] is not None and after[2] is not None else None
    return after[0] - before[0], after[1] - before[1], counts


def summarize(
    outcomes: Sequence[tuple[float, str | None]],
    seconds: float,
    client_cpu_s: float = 0.0,
    server_cpu_s: float | None = None,
    server_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The record of a run, from (latency, error or None) per request; a refusal (admission control) is the
    server protecting itself, not a fault, so it is counted apart."""
    answered = [latency for latency, error in outcomes if error is None]
    errors = [(latency, error) for latency, error in outcomes if error is not None]
    refused = [latency for latency, error in errors if any(m in error for m in OVERLOAD_MESSAGES)]
    out: dict[str, Any] = {
        "sent": len(outcomes), "answered": len(answered), "refused": len(refused),
        "failed": len(errors) - len(refused), "failures": [error for _, error in errors][:3],  # refusals included
        "seconds": seconds, "requests": len(answered), "images_per_s": len(answered) / seconds,  # answered in it
        **{key: 1e3 * float(np.percentile(answered, q)) if answered else None for key, q in PERCENTILES.items()},
        "refusal_max_ms": 1e3 * max(refused) if refused else None,
        "client_cpu_s": client_cpu_s, "server_cpu_s": server_cpu_s,  # the Triton process tree's; None: not measured
        "outcomes": list(outcomes),
    }  # fmt: skip
    if server_counts is not None:  # what Triton saw: time per request, the batch sizes it ran
        requests, executions = server_counts.get("requests", 0), server_counts.get("executions", 0)
        out["server"] = {
            "counts": server_counts, "requests": requests, "executions": executions,
            "mean_batch": server_counts.get("inferences", 0) / executions if executions else float("nan"),
            "queue_ms_per_request": server_counts.get("queue_ns", 0) / 1e6 / requests if requests else None,
            "compute_ms_per_request": server_counts.get("compute_ns", 0) / 1e6 / requests if requests else None,
            "batch_sizes": {int(k[6:]): v for k, v in sorted(server_counts.items()) if k.startswith("batch_") and v},
        }  # fmt: skip
    return out


def combine(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Windows of one configuration pooled into one record (their requests, counters and CPU summed)."""
    counts = sum((Counter(r.get("server", {}).get("counts", {})) for r in results), Counter())
    return summarize(
        [o for r in results for o in r["outcomes"]],
        sum(r["seconds"] for r in results),
        client_cpu_s=sum(r["client_cpu_s"] for r in results),
        server_cpu_s=None if results[0]["server_cpu_s"] is None else sum(r["server_cpu_s"] for r in results),
        server_counts=dict(counts) if "server" in results[0] else None,
    )


def brief(result: dict[str, Any]) -> dict[str, Any]:
    """The record without its per-request outcomes (for JSON files)."""
    return {k: v for k, v in result.items() if k != "outcomes"}


def server_processes(pid: int) -> Iterator[list[str]]:
    """The /proc stat fields (after the name) of every live process in the server's process group: Triton and its
    python backend stubs."""
    for folder in Path("/proc").iterdir():
        try:
            fields = (folder / "stat").read_text().rsplit(")", 1)[1].split() if folder.name.isdigit() else []
        except OSError:
            continue  # gone meanwhile
        if len(fields) > 21 and int(fields[2]) == pid:  # process group id
            yield fields


def server_rss_mb(pid: int) -> float:
    """Resident memory of the server and its stubs."""
    return sum(int(f[21]) for f in server_processes(pid)) * os.sysconf("SC_PAGE_SIZE") / 2**20
