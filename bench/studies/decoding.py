"""Fast vs exact decoding of camera-sized photos: what it saves and what it changes.

Held-out built-in texture images (``training/synthetic.py``, rendered at the size the
model's training images had: a texture's scale depends on it) become 12 MP phone photos:
upscaled to 3024 x 3024, mirrored out to 4032 x 3024, sensor noise added (the full-size
detail that the two decoders shrink differently), saved as JPEG (quality 92, 4:2:0). Each is then decoded
and preprocessed twice by ``threegnet_preprocessing``: exact (full decode, torchvision's
resize) and fast (the default: libjpeg's DCT scaling to the smallest scale that keeps the
shorter side >= the resize target, box pre-shrink of large reductions). Both crops go
through the same trained model; the table gives top-1 agreement, the largest probability
difference and each path's accuracy, and the decode time of each path (plus simplejpeg,
a dedicated libjpeg-turbo binding, when it is installed). Beside it, the model's noise floor:
a second shot of every scene (other sensor noise) decoded exactly, against the first.

Models: ResNet50-3G at 224 px with a head trained on built-in textures (the model of
``bench/low_precision.py``), and the demo model (``model_repository/threegnet``, after
``make demo``) when it is there.

    .venv/bin/python -m bench.studies.decoding [--quick] [--demo-repository model_repository]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, Settings, entry, log, md_table, run_part, stage
from bench.payloads import CAMERA, NOISE_SIGMA, QUALITY, camera_photos

CHUNK = 16
DEMO_RENDER = 128  # pipeline/run_all.py's training images


def _simplejpeg_path(resize: int, crop: int) -> Callable[[bytes], np.ndarray] | None:
    """libjpeg-turbo through simplejpeg (DCT-scaled to the same minimum size), then the same resize
    and crop: only to compare decoders; not a dependency."""
    try:
        import simplejpeg
    except ImportError:
        return None
    from PIL import Image

    from threegnet_preprocessing import center_crop, resize_shorter

    def run(data: bytes) -> np.ndarray:
        pixels = simplejpeg.decode_jpeg(data, min_height=resize, min_width=resize)
        return np.asarray(center_crop(resize_shorter(Image.fromarray(pixels), resize, fast=True), crop))

    return run


def decode_both(blobs: list[bytes], resize: int, crop: int) -> dict[str, Any]:
    """Exact and fast crops of every photo, with each path's time per photo (one core)."""
    from threegnet_preprocessing import Preprocessing, load_and_preprocess

    pp = Preprocessing(resize=resize, crop=crop)
    paths: dict[str, Callable[[bytes], np.ndarray]] = {
        "exact": lambda d: load_and_preprocess(d, pp, fast=False),
        "fast": lambda d: load_and_preprocess(d, pp),
    }
    other = _simplejpeg_path(resize, crop)
    if other is not None:
        paths["simplejpeg"] = other
    crops: dict[str, list[np.ndarray]] = {k: [] for k in paths}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for data in blobs:
        for name, fn in paths.items():  # alternating per photo: both paths see the same machine
            started = time.perf_counter()
            crops[name].append(fn(data))
            times[name].append(time.perf_counter() - started)
    return {
        "crops": {k: np.stack(v) for k, v in crops.items()},
        "ms": {k: 1e3 * np.median(v) for k, v in times.items()},
    }


def compare(
    model: str,
    onnx_path: Path,
    blobs: list[bytes],
    labels: np.ndarray,
    resize: int,
    crop: int,
    second_shot: list[bytes],
) -> dict:
    """Fast against exact decoding of ``blobs`` on one model; ``second_shot`` (the same scenes with
    other sensor noise, decoded exactly) gives the model's own noise floor for the same numbers."""
    with stage(f"{model}: decoding {len(blobs)} photos both ways ({resize} px resize, {crop} px crop)"):
        decoded = decode_both(blobs, resize, crop)
    from export.verify import agreement, probabilities
    from threegnet_preprocessing import Preprocessing, load_and_preprocess

    crops = decoded["crops"]
    with stage(f"{model}: predictions on both, and on a second shot of each scene"):
        exact, fast = (probabilities(onnx_path, crops[k], CHUNK) for k in ("exact", "fast"))
        pp = Preprocessing(resize=resize, crop=crop)
        again = probabilities(onnx_path, np.stack([load_and_preprocess(b, pp, fast=False) for b in second_shot]), CHUNK)
        floor = agreement(again, exact, labels)
    agreed = agreement(fast, exact, labels)
    row = {
        "model": model,
        "resize": resize,
        "crop": crop,
        "photos": len(blobs),
        "decode_ms": decoded["ms"],
        "fast_speedup": decoded["ms"]["exact"] / decoded["ms"]["fast"],
        "top1_agreement": agreed.top1_agreement,
        "disagreements": len(agreed.disagreement_margins),
        "exact_margins_where_they_differ": [round(m, 4) for m in agreed.disagreement_margins],
        "confident_margin": agreed.margin,
        "confident": agreed.confident,
        "confident_disagreements": agreed.confident_disagreements,
        "second_shot_agreement": floor.top1_agreement,
        "second_shot_disagreements": len(floor.disagreement_margins),
        "second_shot_max_abs_diff_probability": float(np.abs(again - exact).max()),
        "max_abs_diff_probability": float(np.abs(exact - fast).max()),
        "mean_abs_diff_pixels": float(np.abs(crops["exact"].astype(np.int16) - crops["fast"]).mean()),
        "accuracy_exact": agreed.accuracy_reference,
        "accuracy_fast": agreed.accuracy,
    }
    if "simplejpeg" in crops:
        row["simplejpeg_same_pixels_as_fast"] = np.array_equal(crops["simplejpeg"], crops["fast"])
    log(f"   agreement {100 * row['top1_agreement']:.1f}%, max |Δp| {row['max_abs_diff_probability']:.3g}")
    return row


def trained_model(settings: Settings, work: Path) -> tuple[Path, int, int]:
    """bench/low_precision.py's trained ResNet50-3G (or the quick run's small model), exported."""
    from bench.common import export
    from bench.low_precision import built_in_data, train_head

    train_x, train_y = built_in_data(settings, "train", settings.train_per_class)
    serving, _ = train_head(settings, train_x, train_y, epochs=6 if not settings.quick else 2)
    return export(serving, work / "trained.onnx", settings.crop), settings.resize, settings.crop


def demo_model(repository: Path) -> tuple[Path, int, int, list[str]] | None:
    """The demo's exported model, its preprocessing record and its labels, if ``make demo`` made one."""
    from export.triton_config import LABELS_FILE, parse_pbtxt

    folder = repository / "threegnet"
    versions = sorted(folder.glob("*/model.onnx"), key=lambda p: int(p.parent.name))
    if not (folder / "config.pbtxt").is_file() or not (folder / LABELS_FILE).is_file() or not versions:
        return None
    params = parse_pbtxt((folder / "config.pbtxt").read_text()).parameters
    pp = json.loads(params["preprocessing"].string_value)
    return versions[-1], int(pp["resize"]), int(pp["crop"]), (folder / LABELS_FILE).read_text().split()


def run(settings: Settings, work: Path, demo_repository: Path | None = ROOT / "model_repository") -> tuple[dict, str]:
    per_class = 32 if not settings.quick else 2
    with stage(f"trained model at {settings.crop} px"):
        onnx_path, resize, crop = trained_model(settings, work)
    with stage(f"{per_class * settings.classes} camera photos ({CAMERA[0]}x{CAMERA[1]} JPEG, quality {QUALITY}), "
               "each shot twice"):  # fmt: skip
        photos = list(camera_photos(settings.classes, per_class, render_size=resize))
        again = [b for b, _ in camera_photos(settings.classes, per_class, render_size=resize, shot=1)]
    blobs, labels = [b for b, _ in photos], np.array([y for _, y in photos])
    sizes = [len(b) for b in blobs]
    rows = [compare(f"{settings.arch} trained on textures", onnx_path, blobs, labels, resize, crop, again)]
    demo = demo_model(demo_repository) if demo_repository else None
    if demo is not None:
        from training.synthetic import CLASS_NAMES

        path, d_resize, d_crop, d_labels = demo
        count = max(1, per_class // 4)
        with stage(f"{count * len(d_labels)} camera photos of the demo's classes (rendered at {DEMO_RENDER} px)"):
            # The demo's labels are its class folders in sorted order.
            classes = [i for i, name in enumerate(CLASS_NAMES) if name in d_labels]
            shots = [list(camera_photos(max(classes) + 1, count, DEMO_RENDER, shot=k)) for k in (0, 1)]
            keep = [i for i, (_, y) in enumerate(shots[0]) if CLASS_NAMES[y] in d_labels]
        blobs = [shots[0][i][0] for i in keep]
        labels = np.array([d_labels.index(CLASS_NAMES[shots[0][i][1]]) for i in keep])
        again = [shots[1][i][0] for i in keep]
        rows.append(compare("demo model (make demo)", path, blobs, labels, d_resize, d_crop, again))
    else:
        log("   no demo model in model_repository/ (run make demo): measured on the trained 224 px model only")
    table = [
        [
            r["model"],
            f"{r['resize']} / {r['crop']}",
            r["photos"],
            f"{r['decode_ms']['exact']:.0f}",
            f"{r['decode_ms']['fast']:.0f}",
            f"{r['fast_speedup']:.1f}x",
            f"{r['decode_ms']['simplejpeg']:.0f}" if "simplejpeg" in r["decode_ms"] else "not installed",
            f"{100 * r['top1_agreement']:.1f}% ({r['disagreements']} differ)",
            f"{r['confident'] - r['confident_disagreements']} of {r['confident']}",
            f"{100 * r['second_shot_agreement']:.1f}% ({r['second_shot_disagreements']} differ)",
            f"{r['max_abs_diff_probability']:.3g}",
            f"{r['mean_abs_diff_pixels']:.2f}",
            f"{100 * r['accuracy_exact']:.1f}% / {100 * r['accuracy_fast']:.1f}%",
        ]
        for r in rows
    ]
    markdown = (
        "### Fast vs exact decoding of 12 MP photos\n\n"
        + md_table(
            [
                "model",
                "resize / crop",
                "photos",
                "exact ms",
                "fast ms",
                "fast speed-up",
                "simplejpeg ms",
                "top-1 agreement",
                f"agree where exact's margin >= {rows[0]['confident_margin']:g}",
                "noise floor: second shot, exact, vs first",
                "max |Δp|",
                "mean |Δ pixel|",
                "accuracy exact / fast",
            ],
            table,
        )
        + "\n\nPhotos: held-out built-in textures rendered at the model's training image size (the trained model: "
        f"{resize} px, the demo: {DEMO_RENDER} px), upscaled to {CAMERA[1]} px, "
        f"mirrored out to {CAMERA[0]}x{CAMERA[1]}, sensor noise σ {NOISE_SIGMA}, JPEG quality {QUALITY} "
        f"({np.median(sizes) / 1e6:.1f} MB median). Times: decode + resize + crop of one photo on one core, medians, "
        "both paths alternating photo by photo. Exact = full decode + torchvision's resize; fast = the default "
        "(`threegnet_preprocessing`: DCT-scaled decode, box pre-shrink). simplejpeg (libjpeg-turbo, DCT-scaled "
        "to the same size) is timed when installed. Noise floor: the same scenes photographed again (only "
        "the sensor noise differs), decoded exactly, against the first shot decoded exactly: how many answers "
        "the model changes for a difference no decoder can avoid.\n"
    )
    data = {
        "camera": CAMERA,
        "quality": QUALITY,
        "median_bytes": float(np.median(sizes)),
        "rows": rows,
    }
    return data, markdown


def main() -> int:
    return run_part("decoding", __doc__, run, demo_repository={"type": Path, "default": ROOT / "model_repository"})


if __name__ == "__main__":
    entry(main)
