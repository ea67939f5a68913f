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
    """One label per line; the official Places365 "/a/airfield 0" lines become "airfield".

    A blank line before the last label is refused (dropping it would shift every later
    label by one, keeping it would make a nameless class), and so is a name given twice
    (the two classes could not be told apart); both name their line numbers.
    """
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"{path}: cannot read labels ({e})") from None
    while lines and not lines[-1]:
        lines.pop()  # blank lines at the end shift nothing
    blank = [number for number, line in enumerate(lines, 1) if not line]
    if blank:
        raise LabelsError(
            f"{path}: blank line{'s' if len(blank) > 1 else ''} {_numbers(blank)}: one label per line, "
            "no blank lines (a dropped line would shift every later label by one)"
        )
    parsed = [_PLACES_LINE.match(line) for line in lines]
    numbered = list(enumerate(lines, 1))
    if lines and all(parsed):
        by_index = {int(m["index"]): (number, m["name"]) for number, m in enumerate(parsed, 1) if m}
        if sorted(by_index) != list(range(len(lines))):
            raise LabelsError(f"{path}: indices are not 0..{len(lines) - 1}")
        numbered = [by_index[i] for i in range(len(lines))]
    where: dict[str, list[int]] = {}
    for number, label in numbered:
        where.setdefault(label, []).append(number)
    duplicates = [f"'{label}' (lines {_numbers(numbers)})" for label, numbers in where.items() if len(numbers) > 1]
    if duplicates:
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        raise LabelsError(f"{path}: duplicate labels: {', '.join(duplicates[:5])}{more}; each class needs its own name")
    return [label for _, label in numbered]


def _numbers(numbers: list[int], limit: int = 10) -> str:
    more = f" ... ({len(numbers)} in all)" if len(numbers) > limit else ""
    return ", ".join(str(n) for n in numbers[:limit]) + more


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
