"""Built-in data: a deterministic ImageFolder dataset of textures that differ in second-order statistics.

Every image is band-pass filtered Gaussian noise laid along one or two colour axes
around a random mean colour. The classes differ in what a covariance describes
(orientation, spatial frequency, bandwidth, anisotropy, which colour channels vary
together) and never in mean colour or overall contrast: those are drawn per image
from one distribution shared by all classes, so a classifier of per-image mean
colour is at chance while a covariance head has all it needs.

    python training/synthetic.py data/textures --classes 8 --per-class 200 --size 128 --seed 0

Only NumPy and Pillow (and tqdm for the progress bar): the generator needs no torch.
The same arguments give byte-identical files on every run.
"""

from __future__ import annotations

import argparse
import colorsys
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

# Colour axes (unit RGB vectors) along which a noise field varies: luminance and the
# two opponent axes. Which channels vary together is the class signal, not the mean.
_AXES = {
    "luma": np.array([1.0, 1.0, 1.0]) / np.sqrt(3.0),
    "red_green": np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0),
    "blue_yellow": np.array([-0.5, -0.5, 1.0]) / np.sqrt(1.5),
}


@dataclass(frozen=True)
class Band:
    """One band-pass noise field: its spectrum and the colour axis it varies along.

    ``period`` is the dominant wavelength in pixels at ``REFERENCE_SIZE``; ``angles`` are
    stripe directions in degrees (0 = horizontal stripes), one picked per image, or
    ``None`` for an isotropic spectrum; ``bandwidth`` is the log-frequency spread.
    """

    period: float
    angles: tuple[float, ...] | None = None
    bandwidth: float = 0.35
    axis: str = "luma"
    weight: float = 1.0


@dataclass(frozen=True)
class TextureClass:
    name: str
    bands: tuple[Band, ...]


# The first eight are the default dataset; every class is its own mirror image, so
# horizontal-flip augmentation never turns one class into another.
CLASSES: tuple[TextureClass, ...] = (
    TextureClass("horizontal_fine", (Band(7, (0,)),)),
    TextureClass("vertical_fine", (Band(7, (90,)),)),
    TextureClass("diagonal_coarse", (Band(18, (45, 135)),)),
    TextureClass("crosshatch", (Band(10, (0,)), Band(10, (90,)))),
    TextureClass("isotropic_grain", (Band(5, bandwidth=0.7),)),
    TextureClass("maze", (Band(9, bandwidth=0.12),)),
    TextureClass("red_green_blobs", (Band(24, bandwidth=0.5, axis="red_green"), Band(24, bandwidth=0.5, weight=0.7))),
    TextureClass(
        "blue_yellow_blobs", (Band(24, bandwidth=0.5, axis="blue_yellow"), Band(24, bandwidth=0.5, weight=0.7))
    ),
    TextureClass("horizontal_coarse", (Band(20, (0,)),)),
    TextureClass("vertical_coarse", (Band(20, (90,)),)),
    TextureClass("diagonal_fine", (Band(6, (45, 135)),)),
    TextureClass("grey_blobs", (Band(24, bandwidth=0.5),)),
)
CLASS_NAMES = tuple(c.name for c in CLASSES)
REFERENCE_SIZE = 128  # periods scale with the image size, so a 64 px dataset looks like a 128 px one
_SPLITS = ("train", "val")


def _band_noise(rng: np.random.Generator, size: int, band: Band) -> np.ndarray:
    """A ``(size, size)`` zero-mean, unit-variance noise field with ``band``'s spectrum."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freq = np.hypot(fx, fy)
    freq[0, 0] = 1.0  # no DC: the amplitude there is zeroed below
    # Cycles per pixel: the period in pixels grows with the image, so a 256 px image shows the
    # same texture as a 128 px one, twice as large. (Below ~64 px the finest bands reach the
    # grid's Nyquist frequency; the spectrum there is cut off, not aliased.)
    centre = REFERENCE_SIZE / (size * band.period * rng.uniform(0.88, 1.12))
    amplitude = np.exp(-(np.log(freq / centre) ** 2) / (2 * band.bandwidth**2))
    if band.angles is not None:
        # Stripes along angle a vary across it: the frequency vector points at a + 90 degrees.
        # The orientation term uses the doubled angle, so opposite frequencies weigh the same.
        angle = np.deg2rad(rng.choice(band.angles) + 90 + rng.uniform(-6, 6))
        amplitude = amplitude * np.exp(6.0 * (np.cos(2 * (np.arctan2(fy, fx) - angle)) - 1))
    amplitude[0, 0] = 0.0
    white = rng.standard_normal((size, size))
    field = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=(size, size))
    return field / (field.std() + 1e-12)


def _mean_colour(rng: np.random.Generator) -> np.ndarray:
    """A pleasant random mean colour (any hue, moderate saturation and value), 0-255."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.2, 0.55), rng.uniform(0.45, 0.72)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def render(cls: TextureClass, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of ``cls``.

    The mean colour and the contrast are drawn independently of the class; after
    clipping, the image is shifted back so its mean is the drawn colour (to within
    rounding), which keeps clipping from leaking class information into the mean.
    """
    field = np.zeros((size, size, 3))
    for band in cls.bands:
        field += band.weight * _band_noise(rng, size, band)[:, :, None] * _AXES[band.axis]
    field /= field.std() + 1e-12
    mean = _mean_colour(rng)
    img = mean + rng.uniform(26.0, 40.0) * field
    for _ in range(4):
        img = np.clip(img + (mean - img.mean(axis=(0, 1))), 0.0, 255.0)
    return np.rint(img).astype(np.uint8)


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """Each image has its own stream: any subset of the dataset regenerates identically."""
    return np.random.default_rng([seed, _SPLITS.index(split), class_index, index])


def generate(
    out: str | Path,
    classes: int = 8,
    per_class: int = 200,
    val_per_class: int | None = None,
    size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write ``out/{train,val}/<class>/<class>_NNNN.png``; returns ``out``."""
    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be between 2 and {len(CLASSES)}, got {classes}")
    if per_class < 1:
        raise ValueError(f"per-class must be >= 1, got {per_class}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    val_per_class = max(1, per_class // 4) if val_per_class is None else val_per_class
    if val_per_class < 1:
        raise ValueError(f"val-per-class must be >= 1, got {val_per_class}")
    out = Path(out)
    counts = {"train": per_class, "val": val_per_class}
    total = classes * (per_class + val_per_class)
    with tqdm(total=total, desc="textures", unit="img", disable=not progress, file=sys.stderr) as bar:
        for split in _SPLITS:
            for class_index, cls in enumerate(CLASSES[:classes]):
                folder = out / split / cls.name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(counts[split]):
                    pixels = render(cls, size, image_rng(seed, split, class_index, i))
                    Image.fromarray(pixels).save(folder / f"{cls.name}_{i:04d}.png", optimize=False)
                    bar.update()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (gets train/ and val/)")
    parser.add_argument("--classes", type=int, default=8, help=f"number of classes (2-{len(CLASSES)})")
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=None, help="default: per-class // 4")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/train and OUT/val if present")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    existing = [args.out / s for s in _SPLITS if (args.out / s).exists()]
    if existing and not args.overwrite:
        parser.error(f"{existing[0]} already exists; pass --overwrite to replace it")
    for path in existing:
        shutil.rmtree(path)
    try:
        generate(
            args.out,
            classes=args.classes,
            per_class=args.per_class,
            val_per_class=args.val_per_class,
            size=args.size,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except ValueError as e:
        parser.error(str(e))
    names = ", ".join(CLASS_NAMES[: args.classes])
    print(f"wrote {args.out}/train and {args.out}/val: {args.classes} classes ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
