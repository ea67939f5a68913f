"""Realistic payloads: what cameras and screenshots make, sent as bytes, against the tensor path.

One Triton server (the shipped repository settings, ``--preprocess-instances`` aside), gRPC,
closed loop at concurrency 4. Rows, each measured in alternating windows with the raw-tensor
model (``threegnet``: the client sends preprocessed uint8 crops, the server only runs the
model) so that both see the same machine:

- a 12 MP phone photo (4032 x 3024 JPEG, ``bench/decoding.py``'s camera photos),
- the same photo as HEIC (what iPhones save),
- a 3 MP PNG (2048 x 1536),
- a 256 px JPEG (what the other benchmarks send).

The bytes rows go to the ensemble ``threegnet_image``: the server decodes, resizes and crops
(``threegnet_preprocessing``, the fast path) before the same model. ``--instances N ...``
repeats the run for each preprocessing instance count: the measurement behind
``PREPROCESS_INSTANCES`` in ``export/triton_config.py``.

    .venv/bin/python bench/payloads.py [--quick] [--instances 1 2 4]
"""

from __future__ import annotations

import io
import itertools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Settings, build_serving, entry, export, log, md_table, part_parser, report, stage
from bench.decoding import camera_photos
from bench.serving import Requests, closed_loop, make_repository

CONCURRENCY = 4
PHOTOS = 4  # distinct files per payload kind (the client cycles through them)
WINDOWS = 3  # tensor / bytes alternations per payload


def payloads(settings: Settings) -> dict[str, list[bytes]]:
    """Encoded files of each kind, and the tensor path's crops come from the same photos."""
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    count = 2 if settings.quick else PHOTOS
    photos = [data for data, _ in itertools.islice(camera_photos(settings.classes, 1, settings.resize), count)]
    out: dict[str, list[bytes]] = {"12 MP JPEG": photos, "12 MP HEIC": [], "3 MP PNG": [], "256 px JPEG": []}
    for data in photos:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            for kind, size, fmt, options in (
                ("12 MP HEIC", img.size, "HEIF", {"quality": 80}),
                ("3 MP PNG", (2048, 1536), "PNG", {}),
                ("256 px JPEG", (341, 256), "JPEG", {"quality": 90}),
            ):
                buf = io.BytesIO()
                (img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)).save(buf, fmt, **options)
                out[kind].append(buf.getvalue())
    return out


def window_seconds(settings: Settings) -> tuple[float, float]:
    """Measured seconds per payload row (split into WINDOWS windows per path) and warm-up per window."""
    return (2.0, 0.5) if settings.quick else (8.0, 1.5)


def measure(
    settings: Settings, work: Path, onnx_path: Path, files: dict[str, list[bytes]], instances: int
) -> list[dict[str, Any]]:
    from serve.server import TritonServer, free_port
    from threegnet_preprocessing import Preprocessing, load_and_preprocess

    pp = Preprocessing(resize=settings.resize, crop=settings.crop)
    tensors = np.stack([load_and_preprocess(data, pp) for data in files["12 MP JPEG"]])
    # No queue timeout: a 12 MP HEIC takes ~0.5 s to decode, and this measures throughput, not admission
    # control (with the shipped 1.5 s timeout, one preprocessing instance refused some HEIC requests).
    overrides = {"preprocess_instances": instances, "queue_timeout_ms": 0}
    repo = make_repository(onnx_path, settings, work / f"payloads-{instances}", overrides)
    seconds, warmup = window_seconds(settings)
    rows = []
    with TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), exit_timeout=3
    ) as server:
        tensor = Requests("grpc", "tensor", tensors, [], server.grpc_url)
        for kind, blobs in files.items():
            sent = Requests("grpc", "bytes", tensors, blobs, server.grpc_url)
            served, reference = [], []
            with stage(f"{instances} preprocessing instance(s): {kind} bytes vs tensors, concurrency {CONCURRENCY}"):
                for _ in range(WINDOWS):
                    reference.append(closed_loop(tensor, CONCURRENCY, seconds / WINDOWS, warmup)["images_per_s"])
                    result = closed_loop(sent, CONCURRENCY, seconds / WINDOWS, warmup)
                    served.append(result["images_per_s"])
            row = {
                "preprocess_instances": instances,
                "payload": kind,
                "median_bytes": float(np.median([len(b) for b in blobs])),
                "bytes_images_per_s": float(np.mean(served)),
                "tensor_images_per_s": float(np.mean(reference)),
                "p50_ms": result["p50_ms"],
            }
            row["bytes_vs_tensor"] = row["bytes_images_per_s"] / row["tensor_images_per_s"]
            log(
                f"   {row['bytes_images_per_s']:.2f} img/s vs tensors {row['tensor_images_per_s']:.2f}: "
                f"{row['bytes_vs_tensor']:.2f}x"
            )
            rows.append(row)
    return rows


def run(
    settings: Settings, work: Path, onnx_path: Path | None = None, instances: tuple[int, ...] | None = None
) -> tuple[dict[str, Any], str]:
    from export.triton_config import PREPROCESS_INSTANCES

    if onnx_path is None:
        serving, _ = build_serving(settings)
        onnx_path = export(serving, work / "model.onnx", settings.crop)
        del serving
    with stage("building the payloads (12 MP JPEG and HEIC, 3 MP PNG, 256 px JPEG)"):
        files = payloads(settings)
    counts = instances or (PREPROCESS_INSTANCES,)
    rows = [r for n in counts for r in measure(settings, work, onnx_path, files, n)]
    table = [
        [
            r["preprocess_instances"],
            r["payload"],
            f"{r['median_bytes'] / 1e6:.2f}",
            f"{r['bytes_images_per_s']:.2f}",
            f"{r['tensor_images_per_s']:.2f}",
            f"{r['bytes_vs_tensor']:.2f}x",
            f"{r['p50_ms']:.0f}",
        ]
        for r in rows
    ]
    markdown = (
        f"### Realistic payloads: bytes vs tensors ({settings.arch}, {settings.crop}x{settings.crop}, gRPC, "
        f"concurrency {CONCURRENCY})\n\n"
        + md_table(
            [
                "preprocessing instances",
                "payload",
                "MB",
                "bytes img/s",
                "tensor img/s (alternating)",
                "bytes / tensor",
                "bytes p50 ms",
            ],
            table,
        )
        + f"\n\nEach row: {WINDOWS} windows of the tensor path and {WINDOWS} of the bytes path in turn, "
        f"{window_seconds(settings)[0] / WINDOWS:.1f} s each after warm-up, {len(files['12 MP JPEG'])} distinct "
        "files per kind. The tensor path sends "
        "the same photos preprocessed on the client (uint8 crops); the bytes path sends the files to "
        "`threegnet_image`, which decodes them in the preprocessing model.\n"
    )
    shipped = [r for r in rows if r["preprocess_instances"] == counts[0]]
    data = {
        "concurrency": CONCURRENCY,
        "rows": rows,
        "bytes_vs_tensor": {r["payload"]: r["bytes_vs_tensor"] for r in shipped},
    }
    return data, markdown


def main() -> int:
    p = part_parser(__doc__)
    p.add_argument("--instances", type=int, nargs="+", help="preprocessing instance counts to compare")
    args = p.parse_args()
    settings = Settings.make(args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data, markdown = run(settings, Path(tmp), instances=tuple(args.instances) if args.instances else None)
    report(args.out, "payloads", data, markdown)
    return 0


if __name__ == "__main__":
    entry(main)
