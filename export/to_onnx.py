"""Export a 3G-Net checkpoint to a verified ONNX model inside a ready Triton model repository.

    python export/to_onnx.py --checkpoint runs/demo/model_best.pth.tar --output-dir model_repository
    python export/to_onnx.py --checkpoint ResNet50-3G-ImageNet.pth.tar --output-dir model_repository

Accepts this project's checkpoints and the authors' released ``.pth.tar`` files
(arch and class count inferred). Writes ``DIR/NAME/config.pbtxt``,
``DIR/NAME/<version>/model.onnx`` and ``DIR/NAME/labels.txt``, plus the
``NAME_preprocess`` model and the ``NAME_image`` ensemble that take encoded image
bytes. Every export is verified against PyTorch with onnxruntime.

Nothing is left behind by a failed or stopped export: the work folder in TMPDIR and
the staging copies in the model repository are removed on any error, SIGINT, SIGTERM
or SIGHUP, and an existing version is either replaced completely or kept.

Exit status:
  0    exported and verified
  2    bad input (checkpoint, labels file, --name, image folders), verification failed,
       or the repository or TMPDIR cannot be written (read-only, no space left on device)
  130  stopped by SIGINT (143 SIGTERM, 129 SIGHUP)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch

from export.labels import LabelsError, resolve_labels
from export.onnx_graph import (
    INPUT,
    TRACE_BATCH,
    GraphError,
    check_graph,
    export_onnx,
    output_names,
    set_metadata,
)
from export.precision import (
    CALIBRATION_IMAGES,
    FP32_MODULES,
    PRECISIONS,
    half_precision,
    missing_modules,
    quantize_int8,
)
from export.repository import RepositoryError, check_writable, choose_version, write_repository
from export.serving_model import ServingModel
from export.triton_config import (
    INTRA_OP_THREADS,
    MAX_BATCH_SIZE,
    MAX_QUEUE_SIZE,
    MODEL_INSTANCES,
    PREPROCESS_INSTANCES,
    QUEUE_TIMEOUT_MS,
    VERSION_POLICY,
    ModelSpec,
    version_policy,
)
from export.verify import (
    CONFIDENT_MARGIN,
    VerificationError,
    VerificationReport,
    agreement,
    check,
    check_agreement,
    compare,
    probabilities,
)
from serve.children import STOP_SIGNALS, Stopped, raise_on_stop_signals
from threegnet_preprocessing import IMAGE_SUFFIXES, ImageError, Preprocessing, load_and_preprocess
from training.checkpoint import (
    CheckpointError,
    describe_os_error,
    exception_in,
    load_model,
    os_error_in,
    sha256sum,
)
from training.model import ARCHS

# Tolerances per precision: (max |Δ probability| vs PyTorch fp32, min top-1 agreement). INT8 is judged
# by export.verify.check_agreement instead: no top-1 change where fp32 is sure, no accuracy lost.
MAX_IMAGES = CALIBRATION_IMAGES  # read from each image folder (calibration, verification) at most
TOLERANCES = {"fp32": (1e-3, 1.0), "fp16": (0.05, 0.9), "int8": (1.0, 0.0)}


# Triton model names as folder names: letters, digits, '_', '-', '.'; not hidden, no path.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_NAME = 200  # the longest derived name (NAME_image_classifier) stays within a file name's 255 bytes


class ExportInputError(ValueError):
    """Bad command-line input (missing image folder...)."""


def check_model_name(name: str) -> None:
    """A name Triton can serve and that stays inside the repository (no '/', '..', '.', '')."""
    if not name:
        raise ExportInputError("--name is empty; give a model name such as threegnet")
    if len(name) > MAX_NAME or MODEL_NAME.fullmatch(name) is None:
        raise ExportInputError(
            f"--name {name!r} is not a valid model name: use letters, digits, '_', '-' and '.' "
            f"(not first), at most {MAX_NAME} characters; it names a folder inside --output-dir"
        )


def project_version() -> str:
    try:
        return importlib.metadata.version("threegnet-serving")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not pip-installed
        return "(source tree)"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description, epilog = __doc__.split("\nExit status:", 1)
    p = argparse.ArgumentParser(
        description=description, epilog="exit status:" + epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="this project's checkpoint or a released .pth.tar")
    p.add_argument("--output-dir", required=True, type=Path, help="the Triton model repository to write into")
    p.add_argument("--name", default="threegnet", help="model name in the repository (default: threegnet)")
    p.add_argument("--arch", choices=sorted(ARCHS), help="override the arch inferred from the checkpoint")
    p.add_argument("--labels", type=Path, help="class names, one per line (Places365 'path index' lines work)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16: for GPUs; int8: for CPU serving")
    p.add_argument("--calibration-images", type=Path, help="folder of images to calibrate INT8 on (required for int8)")
    p.add_argument(
        "--verify-images",
        type=Path,
        help="folder of images to verify on, held out from calibration; class sub-folders named as the labels "
        "give accuracies too (default: the calibration images, or noise)",
    )
    p.add_argument(
        "--int8-confident-margin",
        type=float,
        default=CONFIDENT_MARGIN,
        help=f"INT8 must agree with fp32 on every image where fp32's top-1 margin is at least this "
        f"(default {CONFIDENT_MARGIN})",
    )
    p.add_argument(
        "--int8-fp32-modules",
        nargs="+",
        default=list(FP32_MODULES),
        metavar="MODULE",
        help=f"INT8: modules kept in fp32 besides the second-order head (default: {' '.join(FP32_MODULES)}). "
        "'model.fc model.bn1 model.layer1' (conv1 is fused with bn1) halves the near-tie flips and runs "
        "at ~2.3x fp32 instead of ~2.7x (docs/performance.md, section 3)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=MAX_IMAGES,
        help=f"images read from each folder at most (default: {MAX_IMAGES})",
    )
    p.add_argument("--tensorrt-fp16", action="store_true", help="add the TensorRT FP16 accelerator (GPU deployments)")
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE, help=f"default: {MAX_BATCH_SIZE}")
    p.add_argument(
        "--instances",
        type=int,
        default=MODEL_INSTANCES,
        help=f"model instances (per GPU on GPUs; default: {MODEL_INSTANCES}; 2 on GPUs or contended CPUs)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=INTRA_OP_THREADS,
        help="onnxruntime threads per instance (default: 0 = the cores shared out among the instances)",
    )
    p.add_argument(
        "--allow-spinning",
        action="store_true",
        help="let onnxruntime's threads busy-wait between operators (default: off; it starves the decoders)",
    )
    p.add_argument(
        "--preprocess-instances",
        type=int,
        default=PREPROCESS_INSTANCES,
        help=f"image decoders (default: one per core here, {PREPROCESS_INSTANCES}; size it for the serving machine)",
    )
    p.add_argument(
        "--queue-timeout-ms",
        type=int,
        default=QUEUE_TIMEOUT_MS,
        help=f"refuse requests that waited this long in the queue (default {QUEUE_TIMEOUT_MS}; 0: wait forever)",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=MAX_QUEUE_SIZE,
        help=f"refuse requests beyond this many queued (default {MAX_QUEUE_SIZE}; 0: unbounded)",
    )
    p.add_argument(
        "--version-policy",
        default=VERSION_POLICY,
        help=f"versions Triton serves: latest:N, all or specific:V[,V] (default {VERSION_POLICY})",
    )
    p.add_argument("--version", type=int, help="version number to write (default: the next free one)")
    p.add_argument("--force", action="store_true", help="replace an existing version (default: the latest)")
    args = p.parse_args(argv)
    if args.max_batch_size < 1 or args.instances < 1 or args.preprocess_instances < 1 or args.intra_op_threads < 0:
        p.error("--max-batch-size, --instances and --preprocess-instances must be >= 1, --intra-op-threads >= 0")
    if args.queue_timeout_ms < 0 or args.max_queue_size < 0:
        p.error("--queue-timeout-ms and --max-queue-size must be >= 0")
    try:
        version_policy(args.version_policy)
    except ValueError as e:
        p.error(str(e))
    return args


def read_images(
    folder: Path, pp: Preprocessing, limit: int, class_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to ``limit`` images under ``folder`` (recursive, sorted), preprocessed to uint8 NHWC, and
    their labels when every image sits in a sub-folder named as one of ``class_names``."""
    if not folder.is_dir():
        raise ExportInputError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    # Spread the picks over the folder (class folders are sorted) rather than taking the first class.
    step = max(1, len(files) // limit)
    images, classes = [], []
    for path in files[::step][:limit]:
        try:
            images.append(load_and_preprocess(path, pp))
        except ImageError as e:
            log(f"skipping {path}: {e}")
            continue
        parts = path.relative_to(folder).parts
        classes.append(parts[0] if len(parts) > 1 else None)
    if not images:
        raise ExportInputError(f"{folder}: no readable images")
    labelled = class_names is not None and all(c in class_names for c in classes)
    labels = np.array([class_names.index(c) for c in classes]) if labelled else None
    return np.stack(images), labels


def noise_images(pp: Preprocessing, count: int = 2 * TRACE_BATCH) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, pp.crop, pp.crop, 3), dtype=np.uint8)


def batch_sizes(n: int) -> tuple[int, ...]:
    """1, one more than the traced batch, then the rest of the images in eights."""
    sizes = [1, TRACE_BATCH + 1]
    remaining = n - sum(sizes)
    while remaining > 0:
        sizes.append(min(8, remaining))
        remaining -= sizes[-1]
    return tuple(sizes)


def verify(what: str, onnx_path: Path, reference, images: np.ndarray, precision: str) -> VerificationReport:
    report = compare(onnx_path, reference, images, batch_sizes(len(images)))
    log(f"  {what}: {report.summary()}")
    check(report, *TOLERANCES[precision], what=what)
    return report


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    output_dir = args.output_dir
    check_model_name(args.name)
    check_writable(output_dir)
    if (output_dir / args.name).is_dir():
        check_writable(output_dir / args.name)  # a read-only model folder: say so before a long export
    version = choose_version(output_dir / args.name, args.version, args.force)
    if args.precision == "int8" and args.calibration_images is None:
        raise ExportInputError("--precision int8 needs --calibration-images DIR (a few dozen typical images)")

    log(f"[1/4] loading {args.checkpoint}")
    loaded = load_model(args.checkpoint, arch=args.arch)
    labels, label_source = resolve_labels(loaded.num_classes, loaded.class_names, args.labels)
    kind = "released checkpoint" if loaded.released else "checkpoint"
    log(f"  {loaded.arch}, {loaded.num_classes} classes ({kind}); labels from {label_source}")
    pp = loaded.preprocessing
    serving = ServingModel(loaded.model, pp).eval()

    calibration = read_images(args.calibration_images, pp, args.max_images)[0] if args.calibration_images else None
    labels_of_images = None
    if args.verify_images:
        images, labels_of_images = read_images(args.verify_images, pp, args.max_images, labels)
    else:
        images = calibration if calibration is not None else noise_images(pp)

    with tempfile.TemporaryDirectory(prefix="threegnet-export-") as tmp:
        work = Path(tmp)
        log(f"[2/4] tracing to ONNX ({loaded.arch}, {pp.crop}x{pp.crop} uint8 NHWC input, dynamic batch)")
        fp32_path = work / "fp32.onnx"
        ops = check_graph(export_onnx(serving, fp32_path, pp.crop))
        log(f"  {sum(ops.values())} nodes, {ops.get('MatMul', 0)} MatMul, no Loop/NonZero/Trilu; checker passed")

        log(f"[3/4] verifying with onnxruntime ({len(images)} images)")
        report = verify("fp32 ONNX vs PyTorch", fp32_path, serving, images, "fp32")
        final, reports = fp32_path, {"fp32_vs_pytorch": report}
        if args.precision == "fp16":
            final = work / "fp16.onnx"
            check_graph(export_onnx(half_precision(serving), final, pp.crop))
            reports["fp16_vs_pytorch"] = verify("fp16 ONNX vs PyTorch fp32", final, serving, images, "fp16")
        elif args.precision == "int8":
            final = work / "int8.onnx"
            fp32_modules = tuple(args.int8_fp32_modules)
            unknown = missing_modules(onnx.load(str(fp32_path), load_external_data=False).graph, fp32_modules)
            if unknown:
                raise ExportInputError(
                    f"--int8-fp32-modules: no module {', '.join(unknown)} in this model "
                    "(module paths as in the state dict, e.g. model.fc, model.bn1, model.layer1, model.layer4.2)"
                )
            log(f"  int8: {', '.join(fp32_modules)} kept in fp32 with the second-order head")
            quantize_int8(fp32_path, final, calibration, work, fp32_modules=fp32_modules)
            check_graph(onnx.load(str(final)))
            reports["int8_vs_fp32"] = verify("int8 ONNX vs fp32 ONNX", final, fp32_path, images, "int8")
            if args.verify_images is None:
                log("  (verified on the calibration images: pass --verify-images with held-out ones for a fair test)")
            agreed = agreement(
                probabilities(final, images), probabilities(fp32_path, images), labels_of_images,
                args.int8_confident_margin,
            )  # fmt: skip
            log(f"  int8 vs fp32: {agreed.summary()}")
            check_agreement(agreed, "the INT8 model")
            int8_summary = agreed.summary()

        model = onnx.load(str(final))
        outputs = output_names(serving)
        weight_map_shape = None
        if "weight_map" in outputs:
            dims = next(o for o in model.graph.output if o.name == "weight_map").type.tensor_type.shape.dim
            weight_map_shape = (dims[1].dim_value, dims[2].dim_value)
        sha = sha256sum(args.checkpoint)
        exporter = (
            f"threegnet-serving {project_version()}, "
            f"torch {torch.__version__}, onnx opset {model.opset_import[0].version}"
        )
        common = {
            "arch": loaded.arch,
            "num_classes": loaded.num_classes,
            "precision": args.precision,
            "preprocessing": pp.to_dict(),
            "source_sha256": sha,
        }
        if recorded := recorded_accuracy(loaded.raw):  # what `predict.py --evaluate` prints beside its own
            common["metrics"] = recorded
        set_metadata(
            model,
            {
                **common,
                "num_stages": loaded.model.head.num_stages,
                "dim": loaded.model.head.dim,
                "input": {
                    "name": INPUT,
                    "dtype": "uint8",
                    "shape": ["batch", pp.crop, pp.crop, 3],
                    "layout": "NHWC",
                    "color": "RGB",
                    "preprocessed": "resize + center crop, not normalized",
                },
                "outputs": outputs,
                "labels": labels,
                "source_checkpoint": args.checkpoint.name,
                "exporter": exporter,
                "verification": {
                    **{k: r.summary() for k, r in reports.items()},
                    **(
                        {"int8_agreement": int8_summary, "int8_fp32_modules": list(args.int8_fp32_modules)}
                        if args.precision == "int8"
                        else {}
                    ),
                },
            },
        )
        onnx.save(model, str(final))

        log(f"[4/4] writing {output_dir / args.name} version {version}")
        spec = ModelSpec(
            name=args.name,
            num_classes=loaded.num_classes,
            crop=pp.crop,
            weight_map_shape=weight_map_shape,
            parameters=common,
            max_batch_size=args.max_batch_size,
            tensorrt_fp16=args.tensorrt_fp16,
            instances=args.instances,
            intra_op_threads=args.intra_op_threads,
            allow_spinning=args.allow_spinning,
            queue_timeout_ms=args.queue_timeout_ms,
            max_queue_size=args.max_queue_size,
            version_policy=args.version_policy,
            preprocess_instances=args.preprocess_instances,
        )
        written = write_repository(output_dir, spec, final, labels, pp.to_dict(), version)

    what, final_report = list(reports.items())[-1]
    log(
        f"done in {time.perf_counter() - started:.0f} s: {written['model'] / str(version) / 'model.onnx'}\n"
        f"  {what.replace('_', ' ')}: max abs difference {final_report.max_abs_diff:.3g} (probabilities), "
        f"top-1 agreement {100 * final_report.top1_agreement:.1f}%\n"
        f"  models: {args.name} (uint8 tensors), {spec.image_name} (image bytes), {spec.preprocess_name}, "
        f"{spec.classifier_name} and {spec.image_classifier_name} (probabilities only)\n"
        f"  serve:  python serve/launch.py --model-repository {output_dir}"
    )
    return 0


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Stopped` while exporting, so that every ``finally``
    (the TMPDIR work folder, the repository's staging copies) runs; the previous handlers come back
    after (``main`` may be called inside another program). Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    raise_on_stop_signals()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def recorded_accuracy(checkpoint: dict) -> dict[str, float]:
    """The validation accuracy a checkpoint records (this project's ``metrics``, or a released one's
    ``best_prec1``), in percent; empty when it records none."""
    metrics = checkpoint.get("metrics") or {}
    recorded = {k: float(metrics[k]) for k in ("val_top1", "val_top5", "epoch") if k in metrics}
    if not recorded and isinstance(checkpoint.get("best_prec1"), int | float):
        recorded = {"val_top1": float(checkpoint["best_prec1"])}
    return recorded


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with stop_signals_raise():
            return run(args)
    except (
        CheckpointError,
        LabelsError,
        RepositoryError,
        GraphError,
        VerificationError,
        ExportInputError,
    ) as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:  # SIGINT where no handler of ours was installed (not the main thread)
        log("interrupted: export abandoned; staging removed")
        return 130
    except Exception as e:
        stopped = exception_in(e, Stopped)  # also when a library wrapped it into its own error
        if stopped is not None:
            log(f"{stopped}: export abandoned; staging removed")
            return 128 + stopped.signum
        cause = os_error_in(e)
        if cause is None:
            raise
        path = cause.filename2 or cause.filename  # a copy's destination (shutil names both)
        where = f" ({path})" if path else ""
        log(f"error: {describe_os_error(cause)}{where}; export abandoned, staging removed")
        return 2


if __name__ == "__main__":
    sys.exit(main())
