"""Serving overhead: a Triton server against in-process onnxruntime on the same model file, per concurrency,
gRPC and HTTP, uint8 tensors and JPEG bytes; the two sides alternate so both see the same outside load
(docs/performance.md section 4)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Settings, Worker, entry, fp32_onnx, images, log, md_table, num, onnx_engine, run_part, stage
from bench.load import Load, brief, combine, triton

COMBOS = (("grpc", "tensor"), ("grpc", "bytes"), ("http", "tensor"), ("http", "bytes"))
WINDOWS = 2  # served / in-process alternations per row


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


def wire_bytes(requests: Load) -> dict[str, int]:
    """Request and response body sizes for one image (HTTP headers / HTTP2 framing not counted)."""
    client = requests.client()
    try:
        result = requests.send(client, 0)
        response = result.get_response()
        if requests.protocol == "http":
            body, _ = client.generate_request_body(requests.inputs(0), requests.outputs)
            binary = sum(result.as_numpy(o["name"]).nbytes for o in response["outputs"])
            return {"request": len(body), "response": len(json.dumps(response)) + binary}
        from tritonclient.grpc._utils import _get_inference_request

        request = _get_inference_request(
            requests.model, requests.inputs(0), "", "", requests.outputs, 0, False, False, 0, None, None
        )
        return {"request": request.ByteSize(), "response": response.ByteSize()}
    finally:
        client.close()


def measure(requests: Load, worker: Worker, concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One row: served windows at ``concurrency``, each followed by in-process runs at that batch size for half
    as long (S I S I: outside load changes by the second)."""
    windows, base = [], []
    for _ in range(WINDOWS):
        windows.append(requests.closed(concurrency, seconds / WINDOWS, warmup))
        worker.run(concurrency)  # warm-up
        runs: list[float] = []
        while len(runs) < 2 or sum(runs) < seconds / WINDOWS / 2:
            runs.append(worker.run(concurrency)[0])
        base += runs
    result = brief(combine(windows))
    baseline = {"batch": concurrency, "images_per_s": concurrency * len(base) / sum(base),
                "latency_ms": 1e3 * float(np.median(base)), "runs": len(base)}  # fmt: skip
    return {
        "protocol": requests.protocol, "input": "bytes" if requests.encoded else "tensor", "concurrency": concurrency,
        **result, "client_cpu_cores": result["client_cpu_s"] / seconds,
        "mean_server_batch": result.get("server", {}).get("mean_batch", float("nan")),
        "in_process": baseline, "fraction_of_in_process": result["images_per_s"] / baseline["images_per_s"],
    }  # fmt: skip


def run(
    settings: Settings,
    work: Path,
    onnx_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    combos: tuple[tuple[str, str], ...] = COMBOS,
) -> tuple[dict[str, Any], str]:
    from export import triton_config as tc

    onnx_path = fp32_onnx(settings, work, onnx_path)
    seconds, warmup = settings.serve_seconds, 1.0 if settings.quick else 2.0
    items = {"tensor": list(images(16, settings.crop, seed=1)), "bytes": jpeg_images(settings, 16)}
    rows: list[dict[str, Any]] = []
    with (
        triton(onnx_path, settings, work / "repository", overrides) as server,
        Worker(onnx_engine, str(onnx_path), settings.crop) as worker,
    ):
        wire = {f"{p}_{k}": wire_bytes(Load(server, items[k], p)) for p, k in combos}
        for concurrency in settings.concurrency:
            for protocol, kind in combos:
                with stage(f"Triton {protocol} {kind}, concurrency {concurrency}, vs in-process batch {concurrency}"):
                    row = measure(Load(server, items[kind], protocol), worker, concurrency, seconds, warmup)
                rows.append(row)
                log(f"   {row['images_per_s']:.2f} img/s = {row['fraction_of_in_process']:.0%} of in-process; "
                    f"p50 {num(row['p50_ms'])} ms, p99 {num(row['p99_ms'])} ms")  # fmt: skip
    shipped = {
        "instances": tc.MODEL_INSTANCES, "intra_op_threads": tc.INTRA_OP_THREADS, "max_batch_size": tc.MAX_BATCH_SIZE,
        "queue_delay_us": tc.QUEUE_DELAY_US, "preprocess_instances": tc.PREPROCESS_INSTANCES, **(overrides or {}),
    }  # fmt: skip
    table = [
        [r["concurrency"], r["protocol"], r["input"], f"{r['images_per_s']:.2f}",
         f"{r['in_process']['images_per_s']:.2f}", f"{100 * r['fraction_of_in_process']:.0f}%", num(r["p50_ms"]),
         num(r["p99_ms"]), f"{r['in_process']['latency_ms']:.0f}", f"{r['mean_server_batch']:.1f}",
         f"{r['client_cpu_cores']:.2f}"]
        for r in rows
    ]  # fmt: skip
    wire_table = [[key.replace("_", " "), f"{v['request']:,}", f"{v['response']:,}"] for key, v in sorted(wire.items())]
    markdown = (
        f"### Serving overhead: Triton vs in-process onnxruntime ({settings.arch}, {settings.crop}x{settings.crop})\n\n"
        + md_table(
            "concurrency | protocol | input | served img/s | in-process img/s (batch = concurrency) | "
            "served / in-process | p50 ms | p99 ms | in-process batch ms | server's mean batch | client CPU (cores)",
            table,
        )
        + "\n\nBytes on the wire per image (message bodies; the ensemble's JPEGs are built-in textures at "
        f"{settings.resize}x{settings.resize}, quality 90; the client asks for `probabilities` only):\n\n"
        + md_table(["protocol / input", "request bytes", "response bytes"], wire_table)
        + f"\n\nClosed loop, one image per request; per row {WINDOWS} windows of {seconds / WINDOWS:.0f} s after "
        f"{warmup:.0f} s of warm-up, each followed by {seconds / WINDOWS / 2:.0f} s in process. Server settings: "
        f"{json.dumps(shipped)}; the ONNX model runs in the python-backend stand-in (docs/performance.md section 4).\n"
    )
    at4 = 4 if 4 in settings.concurrency else settings.concurrency[-1]
    fractions = {f"{r['protocol']}_{r['input']}": r["fraction_of_in_process"] for r in rows if r["concurrency"] == at4}
    data = {"arch": settings.arch, "crop": settings.crop, "settings": shipped, "seconds_per_row": seconds,
            "wire_bytes_per_image": wire, "rows": rows, "concurrency_4_fraction": fractions}  # fmt: skip
    return data, markdown


if __name__ == "__main__":
    entry(lambda: run_part("serving", __doc__, run))
