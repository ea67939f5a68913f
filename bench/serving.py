"""Serving overhead: a real Triton server against in-process onnxruntime on the same model file.

For each concurrency (closed loop: every client thread sends one image, waits for the
answer, sends the next), gRPC and HTTP, raw uint8 tensors (model ``threegnet``) and
encoded JPEG bytes (ensemble ``threegnet_image``: decode + resize + crop in the server).
Triton's dynamic batcher merges concurrent requests; the in-process baseline runs
onnxruntime on the same ``model.onnx`` at batch size = concurrency, in its own process,
alternating with the served runs. The server's own metrics give the batch sizes it ran.
Client and server share the machine's cores, as they would on a one-box deployment;
the client's share of the CPU is measured too.

    .venv/bin/python bench/serving.py [--quick]
    .venv/bin/python bench/serving.py --sweep     # the settings behind export/triton_config.py
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    Settings,
    Worker,
    build_serving,
    entry,
    export,
    images,
    log,
    machine,
    machine_markdown,
    md_table,
    onnx_engine,
    part_parser,
    percentile,
    report,
    stage,
    write,
)

MODEL = "threegnet"
OUTPUTS = ["probabilities"]  # what a classifying client asks for
COMBOS = (("grpc", "tensor"), ("grpc", "bytes"), ("http", "tensor"), ("http", "bytes"))
WINDOWS = 2  # served / in-process alternations per row


def make_repository(onnx_path: Path, settings: Settings, repo: Path, overrides: dict[str, Any] | None = None) -> Path:
    """The repository ``export/to_onnx.py`` writes (same config builders), optionally with the
    serving settings changed (for ``--sweep``): ``queue_delay_us``, ``instances``,
    ``intra_op_threads``, ``allow_spinning``, ``preprocess_instances``; and the admission control
    (``bench/overload.py``): ``queue_timeout_ms``, ``max_queue_size``."""
    from export.repository import write_repository
    from export.triton_config import SPINNING_PARAMETER, ModelSpec, parse_pbtxt, to_pbtxt
    from threegnet_preprocessing import Preprocessing

    pp = Preprocessing(resize=settings.resize, crop=settings.crop)
    overrides = overrides or {}
    admission = {k: int(overrides[k]) for k in ("queue_timeout_ms", "max_queue_size") if k in overrides}
    spec = ModelSpec(
        name=MODEL,
        num_classes=settings.num_classes,
        crop=settings.crop,
        weight_map_shape=(settings.crop // 16, settings.crop // 16),
        parameters={"arch": settings.arch, "num_classes": settings.num_classes, "preprocessing": pp.to_dict()},
        **admission,
    )
    labels = [f"class_{i}" for i in range(settings.num_classes)]
    write_repository(repo, spec, onnx_path, labels, pp.to_dict(), version=1)
    for model, keys in (
        (MODEL, ("queue_delay_us", "instances", "intra_op_threads", "allow_spinning")),
        (spec.preprocess_name, ("preprocess_instances",)),
    ):
        if not any(k in overrides for k in keys):
            continue
        path = repo / model / "config.pbtxt"
        cfg = parse_pbtxt(path.read_text())
        if "queue_delay_us" in overrides:
            cfg.dynamic_batching.max_queue_delay_microseconds = int(overrides["queue_delay_us"])
        if "instances" in overrides and model == MODEL:
            cfg.instance_group[0].count = int(overrides["instances"])
        if "intra_op_threads" in overrides:
            cfg.parameters["intra_op_thread_count"].string_value = str(overrides["intra_op_threads"])
        if "allow_spinning" in overrides and model == MODEL:
            cfg.parameters[SPINNING_PARAMETER].string_value = "1" if overrides["allow_spinning"] else "0"
        if "preprocess_instances" in overrides and model != MODEL:
            cfg.instance_group[0].count = int(overrides["preprocess_instances"])
        path.write_text(to_pbtxt(cfg))
    return repo


def jpeg_images(settings: Settings, count: int) -> list[bytes]:
    """Built-in texture images at the served resize size, as JPEG (quality 90): what a client uploads."""
    from PIL import Image

    from training.synthetic import CLASSES, image_rng, render

    blobs = []
    for i in range(count):
        pixels = render(CLASSES[i % 8], settings.resize, image_rng(1, "val", i % 8, i))
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


class Requests:
    """Builds one-image requests for a protocol and an input kind, and sizes them."""

    def __init__(self, protocol: str, kind: str, tensors: np.ndarray, blobs: list[bytes], url: str) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.protocol, self.kind, self.url = protocol, kind, url
        self.module = grpcclient if protocol == "grpc" else httpclient
        self.model = MODEL if kind == "tensor" else f"{MODEL}_image"
        self.tensors, self.blobs = tensors, blobs

    def inputs(self, i: int) -> list[Any]:
        if self.kind == "tensor":
            x = self.tensors[i % len(self.tensors)][None]
            inp = self.module.InferInput("image", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x)
        else:
            inp = self.module.InferInput("image_bytes", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([self.blobs[i % len(self.blobs)]], dtype=object).reshape(1, 1))
        return [inp]

    def outputs(self) -> list[Any]:
        return [self.module.InferRequestedOutput(name) for name in OUTPUTS]

    def client(self) -> Any:
        return self.module.InferenceServerClient(self.url)

    def send(self, client: Any, i: int) -> Any:
        return client.infer(self.model, self.inputs(i), outputs=self.outputs())

    def wire_bytes(self, client: Any) -> dict[str, int]:
        """Request and response body sizes for one image (HTTP headers / HTTP2 framing not counted)."""
        if self.protocol == "http":
            body, _json_size = self.module.InferenceServerClient.generate_request_body(self.inputs(0), self.outputs())
            result = self.send(client, 0)
            response = result.get_response()
            binary = sum(result.as_numpy(o["name"]).nbytes for o in response["outputs"])
            return {"request": len(body), "response": len(json.dumps(response)) + binary}
        from tritonclient.grpc._utils import _get_inference_request

        request = _get_inference_request(
            self.model, self.inputs(0), "", "", self.outputs(), 0, False, False, 0, None, None
        )
        response = self.send(client, 0).get_response()
        return {"request": request.ByteSize(), "response": response.ByteSize()}


def server_processes(pid: int) -> Iterator[tuple[Path, list[str]]]:
    """Every live process in the process group of the server ``pid`` (Triton and its backend stubs):
    its /proc folder and the fields of its stat line after the command name."""
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
    """CPU seconds (user + system) the server ``pid`` and its backend stubs have used so far."""
    return sum(int(f[11]) + int(f[12]) for _, f in server_processes(pid)) / os.sysconf("SC_CLK_TCK")


def closed_loop(
    requests: Requests, concurrency: int, seconds: float, warmup: float, server_pid: int | None = None
) -> dict[str, Any]:
    """``concurrency`` client threads, each with its own connection, sending back to back.

    With ``server_pid``, the CPU the server (with its stubs) and this client used during the
    measured window is in ``window_cpu_s``: together with the images counted in that window it
    says what one image costs the machine on each path.
    """
    clients = [requests.client() for _ in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    start = time.perf_counter() + 0.05
    t0, t1 = start + warmup, start + warmup + seconds
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    window: dict[str, float] = {}

    def meter(pid: int) -> None:
        def cpu_now() -> tuple[float, float]:
            own = resource.getrusage(resource.RUSAGE_SELF)
            return own.ru_utime + own.ru_stime, server_cpu_s(pid)

        time.sleep(max(0.0, t0 - time.perf_counter()))
        client0, server0 = cpu_now()
        time.sleep(max(0.0, t1 - time.perf_counter()))
        client1, server1 = cpu_now()
        window.update(client=client1 - client0, server=server1 - server0)

    def client_loop(k: int) -> None:
        i = k
        while True:
            begin = time.perf_counter()
            if begin >= t1:
                return
            try:
                requests.send(clients[k], i)
            except Exception as e:  # recorded and reported, the load goes on
                errors.append(f"{type(e).__name__}: {e}")
                return
            end = time.perf_counter()
            if t0 <= end <= t1:
                latencies[k].append(end - begin)
            i += concurrency

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(concurrency)]
    if server_pid is not None:
        threads.append(threading.Thread(target=meter, args=(server_pid,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    result = summarize([x for per in latencies for x in per], seconds, cpu=usage_after, cpu_before=usage_before)
    if window:
        result["window_cpu_s"] = window
    return result


def summarize(latencies: list[float], seconds: float, cpu: Any = None, cpu_before: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": len(latencies),
        "images_per_s": len(latencies) / seconds,
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "latencies_s": latencies,
    }
    if cpu is not None and cpu_before is not None:
        used = (cpu.ru_utime - cpu_before.ru_utime) + (cpu.ru_stime - cpu_before.ru_stime)
        out["client_cpu_s"] = used  # the load generator's own CPU time
    return out


def metrics(url: str) -> dict[str, float]:
    """Triton's inference and execution counters for the ONNX model."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        m = re.search(rf'^{name}{{model="{MODEL}",version="1"}} (\S+)$', text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def repeat(worker: Worker, batch: int, seconds: float) -> list[float]:
    """Back-to-back in-process runs at ``batch`` for about ``seconds`` (at least two): their durations."""
    worker.run(batch)  # warm-up
    times: list[float] = []
    while len(times) < 2 or sum(times) < seconds:
        times.append(worker.run(batch)[0])
    return times


def measure(
    server: Any,
    onnx_path: Path,
    settings: Settings,
    tensors: np.ndarray,
    blobs: list[bytes],
    seconds: float,
    warmup: float,
    combos: tuple[tuple[str, str], ...] = COMBOS,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Every (concurrency, protocol, input) row, each next to in-process onnxruntime at that batch size."""
    rows: list[dict[str, Any]] = []
    wire: dict[str, dict[str, int]] = {}
    with Worker(onnx_engine, str(onnx_path), settings.crop) as inproc:
        for protocol, kind in combos:
            req = Requests(protocol, kind, tensors, blobs, server.grpc_url if protocol == "grpc" else server.http_url)
            client = req.client()
            wire[f"{protocol}_{kind}"] = req.wire_bytes(client)
            client.close()
        for concurrency in settings.concurrency:
            for protocol, kind in combos:
                url = server.grpc_url if protocol == "grpc" else server.http_url
                req = Requests(protocol, kind, tensors, blobs, url)
                before = metrics(server.metrics_url)
                windows, base = [], []
                with stage(f"Triton {protocol} {kind}, concurrency {concurrency}, vs in-process batch {concurrency}"):
                    # Served and in-process windows in turn (S I S I): outside load changes by the
                    # second here, and both sides must see the same spread of it.
                    for _ in range(WINDOWS):
                        windows.append(closed_loop(req, concurrency, seconds / WINDOWS, warmup))
                        base += repeat(inproc, concurrency, seconds / WINDOWS / 2)
                after = metrics(server.metrics_url)
                executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
                inferences = after["nv_inference_count"] - before["nv_inference_count"]
                result = summarize([x for w in windows for x in w["latencies_s"]], seconds)
                result.pop("latencies_s")
                cpu = sum(w["client_cpu_s"] for w in windows)
                baseline = {
                    "batch": concurrency,
                    "images_per_s": concurrency * len(base) / sum(base),
                    "latency_ms": 1e3 * float(np.median(base)),
                    "runs": len(base),
                }
                row = {
                    "protocol": protocol,
                    "input": kind,
                    "concurrency": concurrency,
                    **result,
                    "client_cpu_cores": cpu / (seconds + WINDOWS * warmup),
                    "mean_server_batch": inferences / executions if executions else float("nan"),
                    "in_process": baseline,
                    "fraction_of_in_process": result["images_per_s"] / baseline["images_per_s"],
                }
                rows.append(row)
                log(
                    f"   {result['images_per_s']:.2f} img/s = {100 * row['fraction_of_in_process']:.0f}% of in-process "
                    f"{baseline['images_per_s']:.2f}; p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
                    f"server batch {row['mean_server_batch']:.1f}"
                )
    return rows, wire


def run(
    settings: Settings,
    work: Path,
    onnx_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    combos: tuple[tuple[str, str], ...] = COMBOS,
) -> tuple[dict[str, Any], str]:
    from serve.server import TritonServer, free_port

    if onnx_path is None:
        serving, _ = build_serving(settings)
        onnx_path = export(serving, work / "model.onnx", settings.crop)
        del serving
    repo = make_repository(onnx_path, settings, work / "repository", overrides)
    tensors = images(16, settings.crop, seed=1)
    blobs = jpeg_images(settings, 16)
    seconds = settings.serve_seconds
    warmup = 1.0 if settings.quick else 2.0
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), exit_timeout=3)
    with stage("starting Triton"):
        server.start().wait_ready()
    try:
        rows, wire = measure(server, onnx_path, settings, tensors, blobs, seconds, warmup, combos)
    finally:
        server.stop()
    from export.triton_config import (
        INTRA_OP_THREADS,
        MAX_BATCH_SIZE,
        MODEL_INSTANCES,
        PREPROCESS_INSTANCES,
        QUEUE_DELAY_US,
    )

    shipped = {
        "instances": MODEL_INSTANCES,
        "intra_op_threads": INTRA_OP_THREADS,
        "max_batch_size": MAX_BATCH_SIZE,
        "queue_delay_us": QUEUE_DELAY_US,
        "preprocess_instances": PREPROCESS_INSTANCES,
        **(overrides or {}),
    }
    table = [
        [
            r["concurrency"],
            r["protocol"],
            r["input"],
            f"{r['images_per_s']:.2f}",
            f"{r['in_process']['images_per_s']:.2f}",
            f"{100 * r['fraction_of_in_process']:.0f}%",
            f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['in_process']['latency_ms']:.0f}",
            f"{r['mean_server_batch']:.1f}",
            f"{r['client_cpu_cores']:.2f}",
        ]
        for r in rows
    ]
    wire_table = [[key.replace("_", " "), f"{v['request']:,}", f"{v['response']:,}"] for key, v in sorted(wire.items())]
    at4 = [r for r in rows if r["concurrency"] == (4 if 4 in settings.concurrency else settings.concurrency[-1])]
    markdown = (
        f"### Serving overhead: Triton vs in-process onnxruntime ({settings.arch}, {settings.crop}x{settings.crop})\n\n"
        + md_table(
            [
                "concurrency",
                "protocol",
                "input",
                "served img/s",
                "in-process img/s (batch = concurrency)",
                "served / in-process",
                "p50 ms",
                "p99 ms",
                "in-process batch ms",
                "server's mean batch",
                "client CPU (cores)",
            ],
            table,
        )
        + "\n\nBytes on the wire per image (message bodies; the ensemble's JPEGs are built-in textures at "
        f"{settings.resize}x{settings.resize}, quality 90; the client asks for `probabilities` only):\n\n"
        + md_table(["protocol / input", "request bytes", "response bytes"], wire_table)
        + f"\n\nClosed loop, one image per request; per row {WINDOWS} windows of {seconds / WINDOWS:.0f} s (each after "
        f"{warmup:.0f} s of warm-up), each followed by {seconds / WINDOWS / 2:.0f} s of in-process runs. "
        f"Server settings: {json.dumps(shipped)} (intra-op threads 0: the cores shared out among the instances). "
        "The server runs the ONNX model through the python-backend stand-in (`serve/triton_models/onnx_standin.py`): "
        "this Triton build has no onnxruntime backend.\n"
    )
    data = {
        "arch": settings.arch,
        "crop": settings.crop,
        "settings": shipped,
        "seconds_per_row": seconds,
        "wire_bytes_per_image": wire,
        "rows": rows,
        "concurrency_4_fraction": {f"{r['protocol']}_{r['input']}": r["fraction_of_in_process"] for r in at4},
    }
    return data, markdown


SWEEP: tuple[dict[str, Any], ...] = (
    {},
    {"queue_delay_us": 10000},
    {"instances": 2},  # intra-op threads 0: the cores shared out, 1 thread each here
    {"instances": 2, "intra_op_threads": 2},  # what Triton's onnxruntime backend does with 0
)


def sweep(settings: Settings, work: Path, out: Path) -> None:
    """The evidence behind the shipped settings: gRPC tensors at each concurrency, one server per variant."""
    serving, _ = build_serving(settings)
    onnx_path = export(serving, work / "model.onnx", settings.crop)
    del serving
    results = []
    for i, overrides in enumerate(SWEEP):
        with stage(f"sweep variant {overrides or 'shipped'}"):
            data, _ = run(settings, work / f"sweep{i}", onnx_path, overrides, combos=(("grpc", "tensor"),))
        results += [{"overrides": overrides, **r} for r in data["rows"]]
    table = [
        [
            json.dumps(r["overrides"]) if r["overrides"] else "shipped",
            r["concurrency"],
            f"{r['images_per_s']:.2f}",
            f"{100 * r['fraction_of_in_process']:.0f}%",
            f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['mean_server_batch']:.1f}",
        ]
        for r in results
    ]
    markdown = "### Serving settings sweep (gRPC, uint8 tensors)\n\n" + md_table(
        ["variant", "concurrency", "img/s", "of in-process", "p50 ms", "p99 ms", "server's mean batch"], table
    )
    info = machine()
    write(out, "serving_sweep", {"machine": info, "rows": results}, machine_markdown(info) + "\n\n" + markdown)
    print(markdown)


def main() -> int:
    p = part_parser(__doc__)
    p.add_argument("--sweep", action="store_true", help="compare serving settings (slow: a server per variant)")
    args = p.parse_args()
    settings = Settings.make(args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if args.sweep:
            sweep(settings, Path(tmp), args.out)
            return 0
        data, markdown = run(settings, Path(tmp))
    report(args.out, "serving", data, markdown)
    return 0


if __name__ == "__main__":
    entry(main)
