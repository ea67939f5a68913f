"""Every export is checked: onnxruntime against PyTorch on several batch sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

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


def session(path: str | Path, providers: list[str] | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


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
    ref_sess = None if isinstance(reference, ServingModel) else session(reference)
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
