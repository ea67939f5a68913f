"""Realistic payloads: camera and screenshot files sent as bytes to the ensemble that decodes them, in
windows alternating with the tensor path fed the same photos preprocessed on the client; ``--instances``
compares preprocessing instance counts (docs/performance.md section 7)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Result, Settings, entry, fp32_onnx, log, md_table, num, run_part, stage
from bench.load import Load, brief, combine, triton

CONCURRENCY = 4
PHOTOS = 4  # distinct files per payload kind (the client cycles through them)
WINDOWS = 3  # tensor / bytes alternations per payload
CAMERA = (4032, 3024)  # a 12 MP phone photo, landscape
NOISE_SIGMA = 4.7  # sensor noise in 8-bit levels: the full-size detail decoders shrink differently
QUALITY = 92
SEED = 7  # of the scenes and of the first shot's noise


def camera_photos(classes: int, per_class: int, render_size: int, shot: int = 0) -> Iterator[tuple[bytes, int]]:
    """(JPEG bytes, label) of held-out-style built-in textures rendered at ``render_size`` (a texture's
    scale depends on it), upscaled, mirrored out to 12 MP, with sensor noise; labels index
    ``training.synthetic.CLASSES``. Another ``shot`` photographs the same scenes: only the noise differs."""
    from PIL import Image

    from training.synthetic import CLASSES, image_rng, render

    w, h = CAMERA
    noise = np.random.default_rng([SEED, shot] if shot else SEED).normal(0, NOISE_SIGMA, (h, w, 3)).astype(np.float32)
    for i in range(per_class):
        for label in range(classes):
            rng = image_rng(SEED, "val", label, i)
            square = Image.fromarray(render(CLASSES[label], render_size, rng)).resize((h, h), Image.Resampling.BICUBIC)
            pad = (w - h) // 2
            pixels = np.pad(np.asarray(square, dtype=np.float32), ((0, 0), (pad, w - h - pad), (0, 0)), "reflect")
            pixels = np.clip(pixels + np.roll(noise, i * 97, axis=1), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=QUALITY)
            yield buf.getvalue(), label


def payloads(settings: Settings) -> dict[str, list[bytes]]:
    """Encoded files of each kind, all made from the same photos."""
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


def measure(
    settings: Settings, work: Path, onnx_path: Path, files: dict[str, list[bytes]], instances: int, seconds: float
) -> list[dict[str, Any]]:
    from threegnet_preprocessing import Preprocessing, load_and_preprocess

    pp = Preprocessing(resize=settings.resize, crop=settings.crop)
    tensors = [load_and_preprocess(data, pp) for data in files["12 MP JPEG"]]
    # No queue timeout: a 12 MP HEIC takes about half a second to decode, and this measures throughput,
    # not admission control (with the shipped timeout, one preprocessing instance refused some HEIC requests).
    overrides = {"preprocess_instances": instances, "queue_timeout_ms": 0}
    rows = []
    with triton(onnx_path, settings, work / f"payloads-{instances}", overrides) as server:
        for kind, blobs in files.items():
            paths = {"tensor": Load(server, tensors), "bytes": Load(server, blobs)}
            windows: dict[str, list[dict[str, Any]]] = {"tensor": [], "bytes": []}
            with stage(f"{instances} preprocessing instance(s): {kind} bytes vs tensors, concurrency {CONCURRENCY}"):
                for _ in range(WINDOWS):
                    for path, requests in paths.items():
                        windows[path].append(requests.closed(CONCURRENCY, seconds / WINDOWS, warmup=1.5))
            row: dict[str, Any] = {"preprocess_instances": instances, "payload": kind,
                                   "median_bytes": float(np.median([len(b) for b in blobs]))}  # fmt: skip
            cpu_ms = {}  # server + client CPU milliseconds one image costs on each path
            for path, results in windows.items():
                pooled = combine(results)  # equal windows: its img/s is their mean
                row |= {path: brief(pooled), f"{path}_images_per_s": pooled["images_per_s"]}
                for side in ("server", "client"):
                    row[f"{path}_{side}_cpu_ms"] = 1e3 * pooled[f"{side}_cpu_s"] / max(1, pooled["requests"])
                cpu_ms[path] = row[f"{path}_server_cpu_ms"] + row[f"{path}_client_cpu_ms"]
            row["p50_ms"] = row["bytes"]["p50_ms"]
            row["bytes_vs_tensor"] = row["bytes_images_per_s"] / row["tensor_images_per_s"]
            row["cpu_ratio"] = cpu_ms["tensor"] / cpu_ms["bytes"]
            # How many cores each path kept busy on average (server and client together).
            row["cores_busy"] = {path: ms * row[f"{path}_images_per_s"] / 1e3 for path, ms in cpu_ms.items()}
            log(f"   {row['bytes_vs_tensor']:.2f}x the tensor path's img/s; CPU ratio {row['cpu_ratio']:.2f}")
            rows.append(row)
    return rows


def run(settings: Settings, work: Path, onnx_path: Path | None = None, instances: list[int] | None = None) -> Result:
    from export.triton_config import PREPROCESS_INSTANCES

    onnx_path = fp32_onnx(settings, work, onnx_path)
    with stage("building the payloads (12 MP JPEG and HEIC, 3 MP PNG, 256 px JPEG)"):
        files = payloads(settings)
    counts = instances or (PREPROCESS_INSTANCES,)
    # Quick windows still outlast a 12 MP HEIC decode on a busy machine, or that row would count no answer.
    seconds = 4.5 if settings.quick else 8.0
    rows = [r for n in counts for r in measure(settings, work, onnx_path, files, n, seconds)]
    table = [
        [r["preprocess_instances"], r["payload"], f"{r['median_bytes'] / 1e6:.2f}", f"{r['bytes_images_per_s']:.2f}",
         f"{r['tensor_images_per_s']:.2f}", f"{r['bytes_vs_tensor']:.2f}x",
         f"{r['tensor_server_cpu_ms']:.0f} + {r['tensor_client_cpu_ms']:.0f}",
         f"{r['bytes_server_cpu_ms']:.0f} + {r['bytes_client_cpu_ms']:.0f}", f"{r['cpu_ratio']:.2f}",
         f"{r['cores_busy']['tensor']:.2f} / {r['cores_busy']['bytes']:.2f}", num(r["p50_ms"])]
        for r in rows
    ]  # fmt: skip
    markdown = (
        f"### Realistic payloads: bytes vs tensors ({settings.arch}, {settings.crop}x{settings.crop}, gRPC, "
        f"concurrency {CONCURRENCY})\n\n"
        + md_table(
            "preprocessing instances | payload | MB | bytes img/s | tensor img/s (alternating) | bytes / tensor | "
            "CPU ms per image, tensor: server + client | bytes: server + client | CPU tensor / bytes | "
            "cores busy, tensor / bytes | bytes p50 ms",
            table,
        )
        + f"\n\nEach row: {WINDOWS} windows of the tensor path and {WINDOWS} of the bytes path in turn, "
        f"{seconds / WINDOWS:.1f} s each after warm-up, {len(files['12 MP JPEG'])} distinct files per kind. CPU: "
        "the Triton process tree's and the load generator's user + system time per image answered; cores busy = "
        "CPU per image x images/s. How to read the two ratios: docs/performance.md section 7.\n"
    )
    shipped = [r for r in rows if r["preprocess_instances"] == counts[0]]  # the figures run.py's targets read
    by_payload = {key: {r["payload"]: r[key] for r in shipped} for key in ("bytes_vs_tensor", "cpu_ratio")}
    return {"concurrency": CONCURRENCY, "rows": rows, **by_payload}, markdown


if __name__ == "__main__":
    counts = {"type": int, "nargs": "+", "help": "preprocessing instance counts to compare"}
    entry(lambda: run_part("payloads", __doc__, run, instances=counts))
