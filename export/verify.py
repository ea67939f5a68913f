"""Every export is checked: onnxruntime against PyTorch on several batch sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:  # torch is imported only to run the PyTorch reference: session() stays light for workers
    from export.serving_model import ServingModel


class VerificationError(RuntimeError):
    """The ONNX model does not reproduce its reference."""


@dataclass
class BatchReport:
    batch: int
    max_abs_diff_probabilities: float
    max_abs_diff_logits: float
    top1_agreement: float


@dataclass
class VerificationReport:
    """What an export prints and records: worst differences over all batches."""

    batches: list[BatchReport] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max(b.max_abs_diff_probabilities for b in self.batches)

    @property
    def max_abs_diff_logits(self) -> float:
        return max(b.max_abs_diff_logits for b in self.batches)

    @property
    def top1_agreement(self) -> float:
        agreeing = sum(b.top1_agreement * b.batch for b in self.batches)
        return agreeing / sum(b.batch for b in self.batches)

    def summary(self) -> str:
        sizes = ", ".join(str(b.batch) for b in self.batches)
        return (
            f"batch sizes {sizes}: max |Δ probability| = {self.max_abs_diff:.3g}, "
            f"max |Δ logit| = {self.max_abs_diff_logits:.3g}, "
            f"top-1 agreement = {100 * self.top1_agreement:.1f}%"
        )


def session(model: str | Path | bytes, providers: list[Any] | None = None, **options: Any) -> ort.InferenceSession:
    """An onnxruntime session on a model file (or its bytes) the way the server builds one; ``options`` set
    ``SessionOptions`` attributes (e.g. ``enable_profiling``)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for name, value in options.items():
        setattr(opts, name, value)
    model = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(model, opts, providers=providers or ["CPUExecutionProvider"])


def compare(
    onnx_path: str | Path,
    reference: ServingModel | str | Path,
    images: np.ndarray,
    batch_sizes: tuple[int, ...] = (1, 3),
) -> VerificationReport:
    """Run ``images`` (``(N, H, W, 3)`` uint8) through the ONNX model and a reference,
    ``batch_sizes`` at a time, and report the differences. The reference is the
    PyTorch serving model or another ONNX file (for fp16/int8 vs fp32)."""
    sess = session(onnx_path)
    ref_sess = session(reference) if isinstance(reference, str | Path) else None
    report = VerificationReport()
    start = 0
    for batch in batch_sizes:
        x = images[start : start + batch]
        if len(x) < batch:  # wrap around: always exactly `batch` images
            x = np.concatenate([x, images[: batch - len(x)]])
        start = (start + batch) % len(images)
        probs, logits = sess.run(["probabilities", "logits"], {"image": x})
        if ref_sess is not None:
            ref_probs, ref_logits = ref_sess.run(["probabilities", "logits"], {"image": x})
        else:
            import torch

            with torch.no_grad():
                ref_probs, ref_logits = (t.float().numpy() for t in reference(torch.from_numpy(x))[:2])
        report.batches.append(
            BatchReport(
                batch=batch,
                max_abs_diff_probabilities=float(np.abs(probs - ref_probs).max()),
                max_abs_diff_logits=float(np.abs(logits - ref_logits).max()),
                top1_agreement=float(np.mean(probs.argmax(1) == ref_probs.argmax(1))),
            )
        )
    return report


def check(report: VerificationReport, max_abs_diff: float, min_top1_agreement: float, what: str) -> None:
    """Raise :class:`VerificationError` when a report is outside its tolerances."""
    if report.max_abs_diff > max_abs_diff or report.top1_agreement < min_top1_agreement:
        raise VerificationError(
            f"{what} does not match its reference: {report.summary()} "
            f"(allowed: |Δ probability| <= {max_abs_diff:g}, top-1 agreement >= {100 * min_top1_agreement:.0f}%)"
        )


# Low-precision acceptance: what an INT8 export must show against the fp32 ONNX model on the
# verification images, or the export is refused (bench/low_precision.py measures the shipped recipe
# against these on 512 held-out images, docs/performance.md section 3).
CONFIDENT_MARGIN = 0.1  # fp32 top-1 minus top-2 probability from which the two must agree on top-1
MIN_ACCURACY_RATIO = 0.995  # low-precision top-1 accuracy / fp32's, on labelled images (MLPerf asks 0.99)


@dataclass
class Agreement:
    """Top-1 agreement of a low-precision model with fp32, split by how sure fp32 is, and the
    accuracy of both when the images carry labels."""

    images: int
    top1_agreement: float
    margin: float
    confident: int  # images where fp32's top-1 margin >= margin
    confident_disagreements: int
    disagreement_margins: list[float]  # fp32's margin on each image where top-1 differs
    accuracy_reference: float | None = None
    accuracy: float | None = None

    def summary(self) -> str:
        differ = len(self.disagreement_margins)
        where = ", ".join(f"{m:.3f}" for m in sorted(self.disagreement_margins)) or "none"
        text = (
            f"top-1 agreement {100 * self.top1_agreement:.1f}% on {self.images} images ({differ} differ; "
            f"fp32 margins there: {where}); where fp32's margin >= {self.margin:g}: "
            f"{self.confident - self.confident_disagreements} of {self.confident} agree"
        )
        if self.accuracy is not None and self.accuracy_reference is not None:
            text += f"; accuracy {100 * self.accuracy:.1f}% vs fp32 {100 * self.accuracy_reference:.1f}%"
        return text


def agreement(
    probs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None, margin: float = CONFIDENT_MARGIN
) -> Agreement:
    top2 = np.sort(reference, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    differ = probs.argmax(1) != reference.argmax(1)
    confident = margins >= margin
    return Agreement(
        images=len(probs),
        top1_agreement=float(1 - differ.mean()),
        margin=margin,
        confident=int(confident.sum()),
        confident_disagreements=int((differ & confident).sum()),
        disagreement_margins=[float(m) for m in margins[differ]],
        accuracy_reference=None if labels is None else float((reference.argmax(1) == labels).mean()),
        accuracy=None if labels is None else float((probs.argmax(1) == labels).mean()),
    )


def check_agreement(a: Agreement, what: str, min_accuracy_ratio: float = MIN_ACCURACY_RATIO) -> None:
    """Refuse a low-precision model that changes a prediction fp32 is sure of, or loses accuracy."""
    problems = []
    if a.confident_disagreements:
        problems.append(
            f"{a.confident_disagreements} of the {a.confident} images where fp32's top-1 margin is >= {a.margin:g} "
            "change their top-1 class (allowed: none)"
        )
    if a.accuracy is not None and a.accuracy_reference and a.accuracy < min_accuracy_ratio * a.accuracy_reference:
        problems.append(
            f"accuracy {100 * a.accuracy:.1f}% is under {100 * min_accuracy_ratio:.1f}% of fp32's "
            f"{100 * a.accuracy_reference:.1f}%"
        )
    if problems:
        raise VerificationError(f"{what} refused: {'; '.join(problems)}. {a.summary()}")


def probabilities(onnx_path: str | Path, images: np.ndarray, batch: int = 8) -> np.ndarray:
    sess = session(onnx_path)
    chunks = [sess.run(["probabilities"], {"image": images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(chunks)
