"""Accuracy through the server: top-1 and top-5 of a served model on an ImageFolder-layout folder.

What a deployment is checked with after an export or a rollout: the served model, through the
same wire paths users take (encoded bytes to the image ensemble; locally preprocessed crops to the
tensor model), beside the validation accuracy the checkpoint recorded, when the server reveals it.
``client/predict.py DIR --evaluate`` runs it; the classifying itself is the CLI's (batches,
concurrency, one bad image costing only its own answer), this module holds the rest: the folder,
the labels, the scores and the report. No torch here, like every client module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.image_files import collect
from client.inference import ModelInfo, Prediction, TritonClassifier

TOP_K = 5
LABEL_WIDTH = 36  # the column the scores start at in the text report
# The checkpoint's validation accuracy as the export may record it in the model config's parameters:
# flat (``val_top1``, ``val_top5``, percentages) or inside the checkpoint's metrics record (JSON).
RECORD_KEYS = ("val_top1", "val_top5", "epoch")
RECORD_PARAMETERS = ("metrics", "checkpoint_metrics", "validation")


class FolderMismatch(ValueError):
    """The folder is not an ImageFolder of this model's classes (a class folder names no label)."""


@dataclass
class Dataset:
    """The images to evaluate and each one's true class index, in folder order."""

    root: Path
    files: list[Path] = field(default_factory=list)
    truth: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # class folders holding images, sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was not searched)


@dataclass
class Score:
    """Top-1 and top-k hits of one wire path; failed images are left out of the denominators."""

    path: str  # "bytes" or "tensor"
    how: str  # a few words: who preprocesses
    images: int = 0
    top1: int = 0
    top5: int = 0
    failed: int = 0

    def add(self, top_k: list[Prediction] | None, truth: int) -> None:
        if top_k is None:
            self.failed += 1
            return
        self.images += 1
        self.top1 += bool(top_k) and top_k[0].index == truth
        self.top5 += any(p.index == truth for p in top_k[:TOP_K])

    def percent(self, hits: int) -> float:
        return 100.0 * hits / self.images if self.images else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "images": self.images,
            "failed": self.failed,
            "top1": round(self.percent(self.top1), 4),
            "top5": round(self.percent(self.top5), 4),
        }


def class_folders(root: Path) -> list[Path]:
    """ImageFolder's classes: the visible sub-folders of ``root``, sorted by name."""
    if not root.is_dir():
        raise FolderMismatch(f"{root}: not a folder (--evaluate takes one ImageFolder: DIR/<class>/<images>)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FolderMismatch(f"{root}: no class folders (--evaluate takes one ImageFolder: DIR/<class>/<images>)")
    return folders


def server_labels(classifier: TritonClassifier, info: ModelInfo) -> list[str]:
    """Every label of the model, by class index: one request for a blank crop to the tensor model
    with as many classes as it has, which the classification extension answers with all of them
    (``probability:index:label``). Needs no config and no preprocessing record: a locked server answers."""
    blank = np.zeros((1, info.input_size, info.input_size, 3), dtype=np.uint8)
    (answer,) = classifier.classify_tensors(blank, top_k=info.num_classes)
    labels = [""] * info.num_classes
    for p in answer.top_k:
        labels[p.index] = p.label
    return labels


def load_dataset(root: Path, labels: list[str]) -> Dataset:
    """The folder's images with their classes; a class folder that names no label is a
    :class:`FolderMismatch` before anything is classified (a misspelt folder would otherwise
    score as all wrong)."""
    index = {}
    for i, label in enumerate(labels):
        index.setdefault(label, i)
    data = Dataset(root)
    folders = class_folders(root)
    unknown = [f.name for f in folders if f.name not in index]
    if unknown:
        shown = ", ".join(labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
        names = ", ".join(f"'{n}'" for n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise FolderMismatch(
            f"class folder{'s' if len(unknown) > 1 else ''} {names} in {root} match{'es' if len(unknown) == 1 else ''} "
            f"no label of the model (its labels: {shown})"
        )
    for folder in folders:
        found = collect([str(folder)])
        data.skipped += found.skipped
        if found.files:
            data.classes.append(folder.name)
        data.files += found.files
        data.truth += [index[folder.name]] * len(found.files)
    return data


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def recorded_accuracy(classifier: TritonClassifier, info: ModelInfo) -> tuple[dict[str, float] | None, str]:
    """The checkpoint's validation accuracy from the model config's parameters, and where it came
    from or why there is none: the config is private on a locked server (the operators' key, or
    ``--public model-config``, reveals it), and an export may not record it."""
    config = classifier._config(info.name)
    if config is None:
        return None, "not recorded: the server keeps the model config private (a locked control plane)"
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    found = {k: params[k] for k in RECORD_KEYS if k in params}
    for name in RECORD_PARAMETERS:
        try:
            record = json.loads(params.get(name) or "null")
        except ValueError:
            continue
        if isinstance(record, dict):
            found = {k: record[k] for k in RECORD_KEYS if k in record} | found
    numbers = {k: v for k, v in ((k, _as_float(v)) for k, v in found.items()) if v is not None}
    if "val_top1" not in numbers:
        return None, "not recorded in the export"
    return numbers, "the checkpoint's validation accuracy, from the model config"


@dataclass
class Evaluation:
    """The whole result: what --evaluate prints."""

    model: str
    where: str
    images: int
    classes: int
    num_classes: int
    scores: list[Score]
    recorded: dict[str, float] | None
    recorded_note: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "images": self.images,
                "classes": self.classes,
                "num_classes": self.num_classes,
                "top_k": min(TOP_K, self.num_classes),
                "scores": {s.path: s.to_dict() for s in self.scores},
                "recorded": self.recorded,
                "recorded_note": self.recorded_note,
                "notes": self.notes,
            }
        )

    def lines(self) -> list[str]:
        k = min(TOP_K, self.num_classes)
        out = [f"evaluated {self.images} images of {self.classes} classes with {self.model} at {self.where}"]
        for s in self.scores:
            failed = f", {s.failed} failed" if s.failed else ""
            out.append(
                f"  {s.path + ' (' + s.how + ')':<{LABEL_WIDTH}} top-1 {s.percent(s.top1):6.2f}%"
                f"  top-{k} {s.percent(s.top5):6.2f}%  ({s.images} images{failed})"
            )
        if self.recorded is not None:
            top5, epoch = self.recorded.get("val_top5"), self.recorded.get("epoch")
            out.append(
                f"  {'recorded (checkpoint, validation)':<{LABEL_WIDTH}} top-1 {self.recorded['val_top1']:6.2f}%"
                + (f"  top-5 {top5:6.2f}%" if top5 is not None else "")
                + (f"  (epoch {epoch:g})" if epoch is not None else "")
            )
        else:
            out.append(f"  recorded: {self.recorded_note}")
        out += [f"  note: {n}" for n in self.notes]
        return out
