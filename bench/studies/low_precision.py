"""Low precision on the CPU: INT8 (onnxruntime, the export's ``--precision int8``) and bf16
(PyTorch autocast) against fp32: throughput and top-1 agreement on held-out built-in images.

Agreement only means something on a model whose logits do (a random model's probabilities are
near-uniform, and any perturbation reorders them), so the model here is trained, cheaply:

1. ResNet50-3G with 1000 classes (the shipped shape: the fc's weights are part of the cost),
   random backbone weights;
2. each residual branch's last BatchNorm scale set to 0.2 (SkipInit-style, not zero, so every
   convolution still counts): at 1, sixteen random residual branches bury the texture signal and a
   head trained on them stays at chance on held-out images;
3. the backbone's BatchNorm statistics re-estimated on training images (left at their defaults, the
   activations drift far from unit scale, which no real checkpoint has and which would skew INT8
   calibration);
4. the head and fc trained on the backbone's cached features of the built-in textures
   (``training/synthetic.py``), cross-entropy over all 1000 outputs, a few epochs of AdamW;
5. exported exactly as ``export/to_onnx.py`` does, INT8 calibrated on training images, agreement
   measured on held-out images no step above saw.

The INT8 targets of docs/performance.md section 3 are checked against this run. Where the INT8 flips
come from (one module at a time, other bit widths): ``python -m bench.studies.int8``, which runs this first.

    .venv/bin/python -m bench.studies.low_precision [--quick]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    Settings,
    Worker,
    alternate,
    eager_engine,
    entry,
    export,
    log,
    md_table,
    num,
    onnx_engine,
    run_part,
    stage,
)

CHUNK = 16  # images per forward pass when computing features and agreement
RESIDUAL_SCALE = 0.2
# Speed is compared within an engine (INT8 vs fp32 onnxruntime, bf16 vs fp32 PyTorch); agreement
# against onnxruntime fp32 (see run()).
SPEED_REFERENCE = {
    "onnxruntime_fp32": "eager_fp32",
    "onnxruntime_int8": "onnxruntime_fp32",
    "onnxruntime_int8_early_fp32": "onnxruntime_fp32",
    "eager_bf16": "eager_fp32",
}
# 8 classes: 2048 held-out images. On 512 a recipe's few near-tie flips were too few to rank recipes by, and
# a flip the export's gate refuses (fp32 margin >= 0.1) is rarer still (docs/performance.md).
HELD_OUT_PER_CLASS = 256
RECALIBRATION_IMAGES = 32


def built_in_data(settings: Settings, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Train and validation images (uint8 NHWC, preprocessed as served) and labels."""
    from threegnet_preprocessing import Preprocessing, load_and_preprocess
    from training.synthetic import CLASS_NAMES, generate

    generate(
        root,
        classes=settings.classes,
        per_class=settings.train_per_class,
        val_per_class=settings.val_per_class if settings.quick else HELD_OUT_PER_CLASS,
        size=settings.resize,
        seed=0,
        progress=False,
    )
    pp = Preprocessing(resize=settings.resize, crop=settings.crop)
    names = list(CLASS_NAMES[: settings.classes])
    out = []
    for split in ("train", "val"):
        xs, ys = [], []
        for label, name in enumerate(names):
            for path in sorted((root / split / name).glob("*.png")):
                xs.append(load_and_preprocess(path, pp))
                ys.append(label)
        out += [np.stack(xs), np.array(ys)]
    return out[0], out[1], out[2], out[3], names


def train_head(settings: Settings, x: np.ndarray, y: np.ndarray, epochs: int) -> tuple[Any, dict[str, Any]]:
    """Steps 1-4 of the module docstring; returns the serving model (eval mode) and a log.

    Runs on one thread: PyTorch's OpenMP team loses whole time slices at its barriers when other
    processes share the cores, and this is preparation, not a measurement.
    """
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from bench.common import build_serving

    serving, _ = build_serving(settings)
    model = serving.model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for block in model.modules():
        if isinstance(block, Bottleneck | BasicBlock):
            last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            nn.init.constant_(last_bn.weight, RESIDUAL_SCALE)

    def normalized(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float() * serving.scale + serving.shift

    backbone_bns = [m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and "head" not in name]
    for bn in backbone_bns:
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the batches seen
    model.train()
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, min(len(x), RECALIBRATION_IMAGES), CHUNK):
            model.forward_features(normalized(x[i : i + CHUNK]))
    model.eval()
    with torch.inference_mode():
        features = torch.cat([model.forward_features(normalized(x[i : i + CHUNK])) for i in range(0, len(x), CHUNK)])
    feature_s = time.perf_counter() - started

    head, fc = model.head, model.fc
    # The fc learns faster than the head: 992 of its 1000 outputs have to be pushed down.
    optimizer = torch.optim.AdamW(
        [{"params": head.parameters(), "lr": 1e-3}, {"params": fc.parameters(), "lr": 1e-2}], weight_decay=1e-4
    )
    labels = torch.from_numpy(y)
    generator = torch.Generator().manual_seed(0)
    history = []
    started = time.perf_counter()
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        correct, loss_sum = 0, 0.0
        for i in range(0, len(order), CHUNK):
            idx = order[i : i + CHUNK]
            logits = fc(head(features[idx])[0])
            loss = nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
            loss_sum += float(loss.detach()) * len(idx)
        history.append({"epoch": epoch + 1, "loss": loss_sum / len(order), "train_accuracy": correct / len(order)})
        log(f"   epoch {epoch + 1}: loss {history[-1]['loss']:.3f}, train accuracy {history[-1]['train_accuracy']:.2f}")
    model.eval()
    torch.set_num_threads(threads)
    info = {
        "residual_scale": RESIDUAL_SCALE,
        "backbone_bn_recalibrated_on": min(len(x), RECALIBRATION_IMAGES),
        "trained_on": len(x),
        "epochs": epochs,
        "history": history,
        "feature_seconds": feature_s,
        "train_seconds": time.perf_counter() - started,
    }
    return serving, info


def margins(reference: np.ndarray, top1: np.ndarray) -> dict[str, Any]:
    """Where the disagreements are: the reference's top-1 minus top-2 probability on those images,
    and the agreement on the images the reference is not close to a tie on (margin >= 0.1)."""
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    differ = top1 != reference.argmax(1)
    clear = margin >= 0.1
    return {
        "disagreements": int(differ.sum()),
        "reference_margins_where_they_disagree": [round(float(m), 4) for m in margin[differ]],
        "reference_median_margin": float(np.median(margin)),
        "images_with_margin_at_least_0.1": int(clear.sum()),
        "top1_agreement_margin_at_least_0.1": float((~differ[clear]).mean()) if clear.any() else None,
    }


def targets(data: dict[str, Any]) -> str:
    """The INT8 targets (docs/performance.md section 3) against this run, as a table."""
    speed, ratio, confident = data["int8_speedup"], data["int8_accuracy_ratio"], data["int8_confident_agreement"]
    int8, bf16 = data["int8_top1_agreement"], data["bf16_top1_agreement"]
    rows = [
        ("INT8 throughput vs fp32 (onnxruntime)", "2.5x", f"{speed:.2f}x", speed >= 2.5),
        ("INT8 accuracy / fp32 accuracy", "99.5%", f"{ratio:.2%}", ratio >= 0.995),
        ("INT8 top-1 agreement where fp32's margin >= 0.1", "100%", num(confident, ".1%"), confident == 1.0),
        ("INT8 top-1 agreement with fp32 no worse than bf16 autocast's", "INT8 >= bf16",
         f"INT8 {int8:.1%}, bf16 {bf16:.1%}", int8 >= bf16),
    ]  # fmt: skip
    return md_table(["target", "goal", "measured", "met"], [[*r[:3], "yes" if r[3] else "no"] for r in rows])


def predictions(worker: Worker, x: np.ndarray) -> np.ndarray:
    return np.concatenate([worker.run(x[i : i + CHUNK])[1] for i in range(0, len(x), CHUNK)])


def run(settings: Settings, work: Path, keep: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The table; ``keep`` (for the INT8 study) receives the models, images and probabilities it used."""
    import torch

    from export import precision

    with stage("built-in data"):
        train_x, train_y, val_x, val_y, names = built_in_data(settings, work / "data")
    with stage(f"training the head + fc on {len(train_x)} images (backbone features cached)"):
        serving, training = train_head(settings, train_x, train_y, epochs=6 if not settings.quick else 2)
    state_path = work / "trained.pt"
    torch.save(serving.model.state_dict(), state_path)
    with stage("export fp32 + quantize int8 twice (calibrated on training images)"):
        fp32 = export(serving, work / "fp32.onnx", settings.crop)
        del serving
        int8 = work / "int8.onnx"
        # As many training images as the export reads from its calibration folder by default.
        calibration = train_x[:: max(1, len(train_x) // precision.CALIBRATION_IMAGES)][: precision.CALIBRATION_IMAGES]
        started = time.perf_counter()
        precision.quantize_int8(fp32, int8, calibration, work)  # the export's recipe
        quantize_s = time.perf_counter() - started
        # The same with the first layers (conv1, layer1) in fp32 too: where most flips come from, at a price.
        int8_early = work / "int8_early_fp32.onnx"
        precision.quantize_int8(fp32, int8_early, calibration, work, fp32_modules=precision.EARLY_FP32_MODULES)

    batch = 8 if not settings.quick else 4
    engines = {
        "onnxruntime_fp32": (onnx_engine, str(fp32), settings.crop),
        "onnxruntime_int8": (onnx_engine, str(int8), settings.crop),
        "onnxruntime_int8_early_fp32": (onnx_engine, str(int8_early), settings.crop),
        "eager_fp32": (eager_engine, settings, False, str(state_path)),
        "eager_bf16": (eager_engine, settings, True, str(state_path)),
    }
    workers = {name: Worker(*spec) for name, spec in engines.items()}
    try:
        with stage(f"throughput at batch {batch}: {len(workers)} engines, {settings.rounds} alternating rounds"):
            series = alternate({name: w.bind(batch) for name, w in workers.items()}, settings.rounds)
        # Eager fp32 is timed but not asked for predictions: the export verified that onnxruntime fp32
        # reproduces it (probabilities within 1e-3, the same top-1), so onnxruntime fp32 is the reference.
        with stage(f"predictions on {len(val_x)} held-out images"):
            probs = {name: predictions(w, val_x) for name, w in workers.items() if name != "eager_fp32"}
    finally:
        for w in workers.values():
            w.shutdown()

    top1 = {name: p.argmax(1) for name, p in probs.items()}
    pairs = dict.fromkeys(("onnxruntime_int8", "onnxruntime_int8_early_fp32", "eager_bf16"), "onnxruntime_fp32")
    rows, table = [], []
    for name in engines:
        ref = pairs.get(name)
        row = {
            "engine": name,
            "ms_per_batch": 1e3 * series[name].median,
            "images_per_s": batch / series[name].median,
            "accuracy": float((top1[name] == val_y).mean()) if name in top1 else None,
            "speed_reference": SPEED_REFERENCE.get(name),
            "agreement_reference": ref,
            "speedup_vs_reference": series[SPEED_REFERENCE.get(name, name)].median / series[name].median,
            "speedup_vs_onnxruntime_fp32": series["onnxruntime_fp32"].median / series[name].median,
            "top1_agreement": float((top1[name] == top1[ref]).mean()) if ref else None,
            **(margins(probs[ref], top1[name]) if ref else {}),
            "max_abs_diff_probability": float(np.abs(probs[name] - probs[ref]).max()) if ref else None,
            "series": series[name].to_dict(),
        }
        rows.append(row)
        confident = row.get("top1_agreement_margin_at_least_0.1")
        table.append(
            [name.replace("_", " "), f"{row['ms_per_batch']:.0f}", f"{row['images_per_s']:.1f}",
             SPEED_REFERENCE.get(name, "").replace("_", " "),
             f"{row['speedup_vs_reference']:.2f}x" if name in SPEED_REFERENCE else "",
             f"{row['speedup_vs_onnxruntime_fp32']:.2f}x", f"{100 * row['top1_agreement']:.1f}%" if ref else "",
             f"{row['max_abs_diff_probability']:.2g}" if ref else "",
             (", ".join(f"{m:.2f}" for m in row["reference_margins_where_they_disagree"]) or "none") if ref else "",
             f"{100 * confident:.1f}%" if confident is not None else "",
             f"{100 * row['accuracy']:.0f}%" if row["accuracy"] is not None else ""]
        )  # fmt: skip
    by = {r["engine"]: r for r in rows}
    q8, early, bf16 = by["onnxruntime_int8"], by["onnxruntime_int8_early_fp32"], by["eager_bf16"]
    data = {
        "arch": settings.arch, "crop": settings.crop, "num_classes": settings.num_classes, "classes_used": names,
        "batch": batch, "held_out_images": len(val_x), "calibration_images": len(calibration),
        "quantize_seconds": quantize_s, "training": training,
        "int8_speedup": q8["speedup_vs_reference"], "int8_top1_agreement": q8["top1_agreement"],
        "int8_accuracy_ratio": q8["accuracy"] / by["onnxruntime_fp32"]["accuracy"],
        "int8_confident_agreement": q8["top1_agreement_margin_at_least_0.1"],
        "int8_early_fp32_top1_agreement": early["top1_agreement"],
        "int8_early_fp32_speedup": early["speedup_vs_reference"],
        "bf16_speedup_vs_eager_fp32": bf16["speedup_vs_reference"], "bf16_top1_agreement": bf16["top1_agreement"],
        "rows": rows,
    }  # fmt: skip
    final = training["history"][-1]
    markdown = (
        f"### Low precision on the CPU ({settings.arch}, {settings.crop}x{settings.crop}, batch {batch})\n\n"
        + md_table(
            "engine | ms / batch | img/s | speed compared with | speed-up | vs ONNX fp32 | top-1 agreement with "
            "ONNX fp32 | max |Δp| | fp32 margins where top-1 differs | agreement where fp32 margin ≥ 0.1 | "
            "held-out accuracy",
            table,
        )
        + f"\n\nAgreement and accuracy on {len(val_x)} held-out built-in images ({len(names)} texture classes; "
        f"accuracy = argmax over all {settings.num_classes} outputs). Model: random backbone (residual "
        f"branches scaled by {RESIDUAL_SCALE}) with re-estimated BatchNorm statistics, head + fc trained for "
        f"{training['epochs']} epochs on {training['trained_on']} "
        f"images (final train accuracy {100 * final['train_accuracy']:.0f}%). INT8 = `export/precision.py`'s "
        "recipe, what `--precision int8` exports (static QDQ, U8 activations, per-channel S8 weights; in fp32: "
        f"the second-order nodes, softmax, input normalization and {', '.join(precision.FP32_MODULES)}; "
        f"calibration {precision.CALIBRATION_OPTIONS}), calibrated on {len(calibration)} training images; "
        f"`int8 early fp32` is the same with {', '.join(precision.EARLY_FP32_MODULES)} in fp32 (conv1 is fused "
        "with bn1 and named after it). "
        "bf16 = PyTorch `torch.autocast('cpu', torch.bfloat16)` "
        "(the head's covariance and Newton-Schulz stay fp32); onnxruntime has no bf16 path for x86 CPUs. "
        f"Medians of {settings.rounds} alternating rounds, each engine in its own process.\n"
        + "\n#### INT8 targets\n\n"
        + targets(data)
        + "\n"
    )
    if keep is not None:
        keep.update(fp32=fp32, int8=int8, calibration=calibration, val_x=val_x, probs=probs)
    return data, markdown


def main() -> int:
    return run_part("low_precision", __doc__, run)


if __name__ == "__main__":
    entry(main)
