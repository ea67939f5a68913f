"""Class names for an exported model: from the checkpoint, a file, or the known datasets."""

from __future__ import annotations

import re
from pathlib import Path

PLACES365_FILE = Path(__file__).resolve().parent / "labels" / "places365_categories.txt"
_PLACES_LINE = re.compile(r"^/[a-z]/(?P<name>\S+)\s+(?P<index>\d+)$")


class LabelsError(ValueError):
    """Labels that do not fit the model."""


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1K names in sorted-synset order (shipped with torchvision, offline)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def read_labels_file(path: str | Path) -> list[str]:
    """One label per line; the official Places365 "/a/airfield 0" lines become "airfield"."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"{path}: cannot read labels ({e})") from None
    lines = [line for line in lines if line]
    parsed = [_PLACES_LINE.match(line) for line in lines]
    if lines and all(parsed):
        by_index = {int(m["index"]): m["name"] for m in parsed if m}
        if sorted(by_index) != list(range(len(lines))):
            raise LabelsError(f"{path}: indices are not 0..{len(lines) - 1}")
        return [by_index[i] for i in range(len(lines))]
    return lines


def places365_labels() -> list[str]:
    return read_labels_file(PLACES365_FILE)


def resolve_labels(
    num_classes: int, class_names: list[str] | None = None, labels_file: str | Path | None = None
) -> tuple[list[str], str]:
    """The labels for a model and where they came from.

    Priority: an explicit file, the checkpoint's own class names, then the dataset a
    released model's class count implies (1000: ImageNet, 365: Places365).
    """
    if labels_file is not None:
        labels, source = read_labels_file(labels_file), str(labels_file)
    elif class_names:
        labels, source = list(class_names), "checkpoint"
    elif num_classes == 1000:
        labels, source = imagenet_labels(), "ImageNet-1K (torchvision)"
    elif num_classes == 365:
        labels, source = places365_labels(), "Places365"
    else:
        raise LabelsError(
            f"the checkpoint has {num_classes} classes but no class names; pass --labels FILE (one name per line)"
        )
    if len(labels) != num_classes:
        raise LabelsError(f"{source} has {len(labels)} labels but the model has {num_classes} classes")
    bad = [label for label in labels if "\n" in label or not label.strip()]
    if bad:
        raise LabelsError(f"{source}: empty or multi-line labels")
    return labels, source
