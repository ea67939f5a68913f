"""Preprocessing facts and image decoding: the one source of truth for every stage.

Deliberately free of torch (only Pillow and NumPy): training reads the constants,
the exporter writes them into the ONNX metadata and ``config.pbtxt``, the Triton
preprocessing model runs a copy of this very file, and the clients import it to
preprocess locally. Resizing and cropping reproduce torchvision's
``Resize(256)`` + ``CenterCrop(224)`` on PIL images exactly.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoding more than this many pixels is refused (a decompression bomb guard):
# 8192 x 8192 RGB is 192 MiB of pixels, the most one request may cost the server.
MAX_PIXELS = 8192 * 8192
# Smaller than this on either side is refused: such an image holds no texture to classify.
MIN_SIDE = 8


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input (DESIGN §1: evaluation transform)."""

    resize: int = 256  # shorter side, before the centre crop
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # of pixels scaled to [0, 1]
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    layout: str = field(default="NHWC", compare=False)  # of the exported model's uint8 input

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


IMAGENET = Preprocessing()


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


def open_image(source: bytes | str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes or a file into an RGB image, whatever its mode or format.

    Handles EXIF orientation, the first frame of animations, grayscale, palette,
    alpha, CMYK and 16-bit images. Raises :class:`ImageError` for empty, corrupt,
    non-image, too large or too small inputs.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError("empty input: 0 bytes")
        stream: Any = io.BytesIO(source)
    else:
        stream = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (decompression bomb guard)"
                )
            if min(width, height) < MIN_SIDE:
                raise ImageError(f"image is {width}x{height} pixels; both sides must be >= {MIN_SIDE}")
            img.seek(0)  # first frame of GIF/WebP animations
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognized format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large (decompression bomb guard): {e}") from None
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit and 32-bit grayscale are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` with the aspect ratio kept, as torchvision's ``Resize(size)``."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Central ``size x size`` crop with torchvision's rounding."""
    w, h = img.size
    if w < size or h < size:
        raise ImageError(f"image {w}x{h} is smaller than the {size}x{size} crop")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, pp: Preprocessing = IMAGENET) -> np.ndarray:
    """RGB image to the model input: ``(crop, crop, 3)`` uint8, HWC."""
    return np.asarray(center_crop(resize_shorter(img, pp.resize), pp.crop), dtype=np.uint8)


def load_and_preprocess(source: bytes | str | os.PathLike, pp: Preprocessing = IMAGENET) -> np.ndarray:
    """Decode and preprocess in one step; raises :class:`ImageError` for bad input."""
    return preprocess(open_image(source), pp)
