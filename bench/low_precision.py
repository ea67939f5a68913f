"""Low precision on the CPU: INT8 (onnxruntime, the export's ``--precision int8``) and bf16 (PyTorch autocast)
against fp32: throughput and top-1 agreement on held-out built-in images, and the INT8 targets of
docs/performance.md section 3 against them. Agreement only means something on a model whose logits do (a random
model's probabilities are near-uniform, and any perturbation reorders them), so the model is trained, cheaply
(:func:`train_head`). Where the INT8 flips come from (one module at a time, other bit widths):
``python -m bench.studies.int8``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Settings, Worker, alternate, eager_engine, entry, md_table, onnx_engine, run_part, stage

CHUNK = 16  # images per forward pass when computing features and predictions
RESIDUAL_SCALE = 0.2
RECALIBRATION_IMAGES = 32
# 8 classes: 2048 held-out images. On 512 a recipe's few near-tie flips were too few to rank recipes by, and
# a flip the export's gate refuses (fp32 margin >= 0.1) is rarer still (docs/performance.md).
HELD_OUT_PER_CLASS = 256
# Speed is compared within an engine (INT8 vs fp32 onnxruntime, bf16 vs fp32 PyTorch); agreement with
# onnxruntime fp32, which the export verified against PyTorch fp32 (probabilities within 1e-3, the same top-1).
SPEED_REFERENCE = {"onnxruntime_fp32": "eager_fp32", "onnxruntime_int8": "onnxruntime_fp32",
                   "onnxruntime_int8_early_fp32": "onnxruntime_fp32", "eager_bf16": "eager_fp32"}  # fmt: skip
COMPARED = ("onnxruntime_int8", "onnxruntime_int8_early_fp32", "eager_bf16")  # with onnxruntime fp32


def built_in_data(settings: Settings, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each class of ``training/synthetic.py``'s ``split`` (what ``generate`` writes,
    rendered in memory), preprocessed as served (uint8 NHWC), and their labels."""
    from PIL import Image

    from threegnet_preprocessing import Preprocessing, preprocess
    from training.synthetic import CLASSES, image_rng, render

    pp = Preprocessing(resize=settings.resize, crop=settings.crop)
    labels = np.repeat(np.arange(settings.classes), per_class)
    pixels = (render(CLASSES[c], settings.resize, image_rng(0, split, c, i % per_class)) for i, c in enumerate(labels))
    return np.stack([preprocess(Image.fromarray(p), pp) for p in pixels]), labels


def train_head(settings: Settings, x: np.ndarray, y: np.ndarray, epochs: int) -> tuple[Any, dict[str, Any]]:
    """ResNet50-3G with 1000 classes (the fc's weights are part of the cost) and random backbone weights, each
    residual branch's last BatchNorm scale at 0.2 (SkipInit-style: at 1, sixteen random branches bury the texture
    signal and a head trained on them stays at chance) and the backbone's BatchNorm statistics re-estimated on
    training images (at their defaults activations drift far from unit scale, which no real checkpoint has and
    which would skew INT8 calibration); then the head and fc trained on the backbone's cached features. Returns
    the serving model (eval mode) and a log. On one thread: PyTorch's OpenMP team loses whole time slices at its
    barriers when other processes share the cores, and this is preparation, not a measurement."""
    import torch
    from torch import nn
    from torch.optim.swa_utils import update_bn
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from bench.common import build_serving, log

    serving, _ = build_serving(settings)
    model, threads = serving.model, torch.get_num_threads()
    torch.set_num_threads(1)
    for block in model.modules():
        if isinstance(block, Bottleneck | BasicBlock):
            nn.init.constant_((block.bn3 if isinstance(block, Bottleneck) else block.bn2).weight, RESIDUAL_SCALE)
    stem_and_layers = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    backbone = nn.Sequential(*(getattr(model, n) for n in stem_and_layers)).eval()  # forward_features, for update_bn
    batches = [
        torch.from_numpy(x[i : i + CHUNK]).permute(0, 3, 1, 2).float() * serving.scale + serving.shift
        for i in range(0, len(x), CHUNK)
    ]
    started = time.perf_counter()
    with torch.inference_mode():
        update_bn(batches[: RECALIBRATION_IMAGES // CHUNK], backbone)  # running statistics: their plain average
        features = torch.cat([backbone(batch) for batch in batches])
    feature_s, started = time.perf_counter() - started, time.perf_counter()
    # The fc learns faster than the head: 992 of its 1000 outputs have to be pushed down.
    groups = [{"params": model.head.parameters(), "lr": 1e-3}, {"params": model.fc.parameters(), "lr": 1e-2}]
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    labels, generator, history = torch.from_numpy(y), torch.Generator().manual_seed(0), []
    model.head.train()
    for epoch in range(1, epochs + 1):
        correct, loss_sum = 0, 0.0
        for idx in torch.randperm(len(features), generator=generator).split(CHUNK):
            logits = model.fc(model.head(features[idx])[0])
            loss = nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
            loss_sum += float(loss.detach()) * len(idx)
        history.append({"epoch": epoch, "loss": loss_sum / len(x), "train_accuracy": correct / len(x)})
        log(f"   epoch {epoch}: loss {history[-1]['loss']:.3f}, train accuracy {history[-1]['train_accuracy']:.2f}")
    model.eval()
    torch.set_num_threads(threads)
    info = {"residual_scale": RESIDUAL_SCALE, "backbone_bn_recalibrated_on": min(len(x), RECALIBRATION_IMAGES),
            "trained_on": len(x), "epochs": epochs, "history": history, "feature_seconds": feature_s,
            "train_seconds": time.perf_counter() - started}  # fmt: skip
    return serving, info


def targets(data: dict[str, Any]) -> str:
    """The INT8 targets (docs/performance.md section 3) against this run, as a table."""
    speed, ratio, confident = data["int8_speedup"], data["int8_accuracy_ratio"], data["int8_confident_agreement"]
    int8, bf16 = data["int8_top1_agreement"], data["bf16_top1_agreement"]
    rows = [
        ("INT8 throughput vs fp32 (onnxruntime)", "2.5x", f"{speed:.2f}x", speed >= 2.5),
        ("INT8 accuracy / fp32 accuracy", "99.5%", f"{ratio:.2%}", ratio >= 0.995),
        ("INT8 top-1 agreement where fp32's margin >= 0.1", "100%", "-" if confident is None else f"{confident:.1%}",
         confident == 1.0),
        ("INT8 top-1 agreement with fp32 no worse than bf16 autocast's", "INT8 >= bf16",
         f"INT8 {int8:.1%}, bf16 {bf16:.1%}", int8 >= bf16),
    ]  # fmt: skip
    return md_table(["target", "goal", "measured", "met"], [[*r[:3], "yes" if r[3] else "no"] for r in rows])


def run(settings: Settings, work: Path, keep: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The table; ``keep`` (for the INT8 study) receives the models, images and probabilities it used."""
    import torch

    from bench.common import export
    from export import precision
    from export.verify import agreement
    from training.synthetic import CLASS_NAMES

    with stage("built-in data"):
        train_x, train_y = built_in_data(settings, "train", settings.train_per_class)
        val_x, val_y = built_in_data(settings, "val", settings.val_per_class if settings.quick else HELD_OUT_PER_CLASS)
    with stage(f"training the head + fc on {len(train_x)} images (backbone features cached)"):
        serving, training = train_head(settings, train_x, train_y, epochs=2 if settings.quick else 6)
    state, fp32, int8, early = (work / f for f in ("trained.pt", "fp32.onnx", "int8.onnx", "int8_early_fp32.onnx"))
    torch.save(serving.model.state_dict(), state)
    # As many training images as the export reads from its calibration folder by default.
    calibration = train_x[:: max(1, len(train_x) // precision.CALIBRATION_IMAGES)][: precision.CALIBRATION_IMAGES]
    with stage("export fp32 + quantize int8 twice (calibrated on training images)"):
        export(serving, fp32, settings.crop)
        started = time.perf_counter()
        precision.quantize_int8(fp32, int8, calibration, work)  # the export's recipe
        quantize_s = time.perf_counter() - started
        # The same with the first layers (conv1, layer1) in fp32 too: where most flips come from, at a price.
        precision.quantize_int8(fp32, early, calibration, work, fp32_modules=precision.EARLY_FP32_MODULES)
    batch = 4 if settings.quick else 8
    engines = {
        "onnxruntime_fp32": (onnx_engine, str(fp32), settings.crop),
        "onnxruntime_int8": (onnx_engine, str(int8), settings.crop),
        "onnxruntime_int8_early_fp32": (onnx_engine, str(early), settings.crop),
        "eager_fp32": (eager_engine, settings, False, str(state)),
        "eager_bf16": (eager_engine, settings, True, str(state)),
    }
    with contextlib.ExitStack() as stack:
        workers = {name: stack.enter_context(Worker(*spec)) for name, spec in engines.items()}
        with stage(f"throughput at batch {batch}: {len(workers)} engines, {settings.rounds} alternating rounds"):
            series = alternate({name: w.bind(batch) for name, w in workers.items()}, settings.rounds)
        with stage(f"predictions on {len(val_x)} held-out images"):  # eager fp32's are onnxruntime fp32's
            probs = {name: np.concatenate([w.run(val_x[i : i + CHUNK])[1] for i in range(0, len(val_x), CHUNK)])
                     for name, w in workers.items() if name != "eager_fp32"}  # fmt: skip
    fp32_probs = probs["onnxruntime_fp32"]
    rows, table = [], []
    for name in engines:
        median, reference = series[name].median, SPEED_REFERENCE.get(name)
        row: dict[str, Any] = {
            "engine": name, "ms_per_batch": 1e3 * median, "images_per_s": batch / median,
            "accuracy": float((probs[name].argmax(1) == val_y).mean()) if name in probs else None,
            "speed_reference": reference, "speedup_vs_reference": series[reference or name].median / median,
            "speedup_vs_onnxruntime_fp32": series["onnxruntime_fp32"].median / median, "series": series[name].to_dict(),
        }  # fmt: skip
        agreement_cells = [""] * 4
        if name in COMPARED:  # as the export's INT8 gate measures it (margin: fp32's top-1 minus top-2 probability)
            a = agreement(probs[name], fp32_probs, val_y)
            confident = 1 - a.confident_disagreements / a.confident if a.confident else None
            diff = float(np.abs(probs[name] - fp32_probs).max())
            row |= asdict(a) | {"confident_agreement": confident, "max_abs_diff_probability": diff}
            agreement_cells = [f"{100 * a.top1_agreement:.1f}%", f"{diff:.2g}",
                               ", ".join(f"{m:.2f}" for m in a.disagreement_margins) or "none",
                               "" if confident is None else f"{100 * confident:.1f}%"]  # fmt: skip
        rows.append(row)
        table.append(
            [name.replace("_", " "), f"{row['ms_per_batch']:.0f}", f"{row['images_per_s']:.1f}",
             (reference or "").replace("_", " "), f"{row['speedup_vs_reference']:.2f}x" if reference else "",
             f"{row['speedup_vs_onnxruntime_fp32']:.2f}x", *agreement_cells,
             "" if row["accuracy"] is None else f"{100 * row['accuracy']:.0f}%"]
        )  # fmt: skip
    by = {r["engine"]: r for r in rows}
    q8 = by["onnxruntime_int8"]
    data = {
        "arch": settings.arch, "crop": settings.crop, "num_classes": settings.num_classes,
        "classes_used": list(CLASS_NAMES[: settings.classes]), "batch": batch, "held_out_images": len(val_x),
        "calibration_images": len(calibration), "quantize_seconds": quantize_s, "training": training,
        "int8_speedup": q8["speedup_vs_reference"], "int8_top1_agreement": q8["top1_agreement"],
        "int8_accuracy_ratio": q8["accuracy"] / by["onnxruntime_fp32"]["accuracy"],
        "int8_confident_agreement": q8["confident_agreement"],
        "bf16_top1_agreement": by["eager_bf16"]["top1_agreement"], "rows": rows,
    }  # fmt: skip
    markdown = (
        f"### Low precision on the CPU ({settings.arch}, {settings.crop}x{settings.crop}, batch {batch})\n\n"
        + md_table(
            "engine | ms / batch | img/s | speed compared with | speed-up | vs ONNX fp32 | top-1 agreement with "
            "ONNX fp32 | max |Δp| | fp32 margins where top-1 differs | agreement where fp32 margin ≥ 0.1 | "
            "held-out accuracy",
            table,
        )
        + f"\n\nAgreement and accuracy on {len(val_x)} held-out built-in images ({settings.classes} texture "
        f"classes; accuracy = argmax over all {settings.num_classes} outputs). Model: random backbone (residual "
        f"branches scaled by {RESIDUAL_SCALE}) with re-estimated BatchNorm statistics, head + fc trained for "
        f"{training['epochs']} epochs on {training['trained_on']} images (final train accuracy "
        f"{100 * training['history'][-1]['train_accuracy']:.0f}%). INT8 = `export/precision.py`'s "
        "recipe, what `--precision int8` exports (static QDQ, U8 activations, per-channel S8 weights; in fp32: "
        f"the second-order nodes, softmax, input normalization and {', '.join(precision.FP32_MODULES)}; "
        f"calibration {precision.CALIBRATION_OPTIONS}), calibrated on {len(calibration)} training images; "
        f"`int8 early fp32` is the same with {', '.join(precision.EARLY_FP32_MODULES)} in fp32 (conv1 is fused "
        "with bn1 and named after it). bf16 = PyTorch `torch.autocast('cpu', torch.bfloat16)` (the head's "
        "covariance and Newton-Schulz stay fp32); onnxruntime has no bf16 path for x86 CPUs. "
        f"Medians of {settings.rounds} alternating rounds, each engine in its own process.\n\n"
        f"#### INT8 targets\n\n{targets(data)}\n"
    )
    if keep is not None:
        keep.update(fp32=fp32, int8=int8, calibration=calibration, val_x=val_x, probs=probs)
    return data, markdown


if __name__ == "__main__":
    entry(lambda: run_part("low_precision", __doc__, run))
