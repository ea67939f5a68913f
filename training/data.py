"""ImageFolder data for training: checked up front, robust to bad files while running.

Layout: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (subfolders of a class are
searched too, as torchvision's ``ImageFolder`` does). Problems that make a run
pointless (a missing split, an empty class, train and val disagreeing on the classes)
raise :class:`DataError` before any training starts. A file that turns out unreadable
while training is skipped and counted instead: one bad JPEG in a million must not
stop a multi-day run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from threegnet_preprocessing import IMAGE_SUFFIXES, ImageError, Preprocessing, open_image, resize_shorter

# What the server, the CLI and the export accept (HEIC, AVIF, ...) and what torchvision's ImageFolder finds.
EXTENSIONS = tuple(sorted(IMAGE_SUFFIXES.union(IMG_EXTENSIONS)))


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names the folder and the reason."""


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split (the order ``ImageFolder`` gives)."""
    if not split_dir.is_dir():
        what = "is not a directory" if split_dir.exists() else "does not exist"
        raise DataError(f"{split_dir} {what} (expected ROOT/train/<class>/... and ROOT/val/<class>/...)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders")
    return classes


def check_classes(root: Path, splits: Sequence[str]) -> list[str]:
    """The class names shared by ``splits``; different lists are a :class:`DataError`."""
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    found = {split: find_classes(root / split) for split in splits}
    first, *others = splits
    for split in others:
        if found[split] != found[first]:
            detail = "; ".join(
                f"only in {a}: {_sample(sorted(set(found[a]) - set(found[b])))}"
                for a, b in ((first, split), (split, first))
                if set(found[a]) - set(found[b])
            )
            raise DataError(f"{root}: {first} and {split} have different class folders ({detail})")
    return found[first]


def _sample(names: list[str], limit: int = 5) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def scan(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image file, sorted; an empty class is a :class:`DataError`."""
    samples = []
    for index, name in enumerate(classes):
        files = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, filenames in os.walk(split_dir / name, followlinks=True)
            for f in filenames
            if f.lower().endswith(EXTENSIONS) and not f.startswith(".")
        )
        if not files:
            raise DataError(f"class folder {split_dir / name} holds no image files ({', '.join(EXTENSIONS)})")
        samples.extend((f, index) for f in files)
    return samples


@dataclass(frozen=True)
class Unreadable:
    """What a dataset returns in place of a sample it could not decode."""

    path: str
    reason: str


class ImageFolderData(Dataset):
    """``ImageFolder`` that decodes with :func:`open_image` (any mode to RGB) and never raises
    on a bad file: it returns :class:`Unreadable`, which :func:`collate_skipping` drops.

    ``min_side``: large JPEGs may be decoded at a reduced scale keeping both sides >= it
    (for evaluation: the served decode, see :func:`threegnet_preprocessing.open_image`)."""

    def __init__(
        self,
        split_dir: Path,
        classes: Sequence[str],
        transform: Callable[[Image.Image], Tensor],
        min_side: int | None = None,
    ):
        self.root = split_dir
        self.classes = list(classes)
        self.samples = scan(split_dir, self.classes)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | Unreadable:
        path, target = self.samples[index]
        try:
            img = open_image(path, min_side=self.min_side)
        except (ImageError, OSError) as e:
            return Unreadable(os.path.relpath(path, self.root), str(e).splitlines()[0])
        return self.transform(img), target


@dataclass
class Batch:
    images: Tensor
    targets: Tensor
    skipped: list[Unreadable]

    def __len__(self) -> int:
        return len(self.targets)


def collate_skipping(items: list[tuple[Tensor, int] | Unreadable]) -> Batch:
    """Stack the good samples; report the unreadable ones (the batch may come out smaller or empty)."""
    good = [item for item in items if not isinstance(item, Unreadable)]
    skipped = [item for item in items if isinstance(item, Unreadable)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images, targets = default_collate(good)
    return Batch(images, targets, skipped)


def train_transform(pp: Preprocessing, min_scale: float = 0.08) -> Callable[[Image.Image], Tensor]:
    """The released recipe's augmentation: RandomResizedCrop + horizontal flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(pp.crop, scale=(min_scale, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(pp.mean, pp.std),
        ]
    )


def eval_transform(pp: Preprocessing, ten_crop: bool = False) -> Callable[[Image.Image], Tensor]:
    """Resize + CenterCrop (``(3, crop, crop)``), or Resize + TenCrop (``(10, 3, crop, crop)``).

    The resize is the served one (:func:`threegnet_preprocessing.resize_shorter`, fast path),
    so with ``ImageFolderData(..., min_side=pp.resize)`` validation numbers are the served
    model's numbers.
    """
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(pp.mean, pp.std)])
    crop = transforms.TenCrop(pp.crop) if ten_crop else transforms.CenterCrop(pp.crop)
    last = _StackCrops(to_tensor) if ten_crop else to_tensor
    served_resize = functools.partial(resize_shorter, size=pp.resize, fast=True)  # picklable for workers
    return transforms.Compose([served_resize, crop, last])


class _StackCrops:
    """TenCrop's tuple of PIL crops to one tensor (a class, not a lambda: workers pickle it)."""

    def __init__(self, to_tensor: Callable[[Image.Image], Tensor]) -> None:
        self.to_tensor = to_tensor

    def __call__(self, crops: Sequence[Image.Image]) -> Tensor:
        return torch.stack([self.to_tensor(c) for c in crops])
