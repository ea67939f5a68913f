"""Preprocessing facts and image decoding: the one source of truth for every stage.

Deliberately free of torch (only Pillow, pillow-heif and NumPy): training reads the
constants, the exporter writes them into the ONNX metadata and ``config.pbtxt``, the
Triton preprocessing model runs a copy of this very file, and the clients import it to
preprocess locally. The exact path (``fast=False``) reproduces torchvision's
``Resize(256)`` + ``CenterCrop(224)`` on PIL images bit for bit; the default fast path
decodes large JPEGs at a reduced DCT scale and pre-shrinks other large images with a box
filter first, at a quarter of the cost on a 12 MP photo; what that changes in a model's
predictions is measured by ``bench/studies/decoding.py`` (docs/performance.md section 7).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF (what iPhones save); Pillow reads AVIF itself
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - a base dependency; a bare copy still decodes the rest
    pass

# Decoding more than this many pixels is refused (a decompression bomb guard):
# 8192 x 8192 RGB is 192 MiB of pixels, the most one request may cost the server.
MAX_PIXELS = 8192 * 8192
# Smaller than this on either side is refused: such an image holds no texture to classify.
MIN_SIDE = 8
# Longer side over shorter side, at most. The pixel cap alone lets thin images through (8 x 250000 is
# 2 Mpx), and resizing their short side to the target blew them up to gigabytes. Real uploads stay
# well inside 20:1: phone panoramas are about 4:1 (a 360-degree sweep 8-9:1), equirectangular 2:1,
# a long scrolling screenshot of a dozen screens 1080 x 20000 about 19:1. The centre crop of a 20:1
# image already sees 5% of it; beyond that there is nothing left to classify.
MAX_ASPECT = 20.0
# The image resized to the model's shorter side (the intermediate before the crop), at most this many
# pixels: with MAX_ASPECT it only binds for resize targets over 915 px, and it is what bounds the work
# whatever the preprocessing record says (4096 x 4096 RGB: 48 MiB).
MAX_RESIZED_PIXELS = 4096 * 4096
# Encoded bytes of one image, at most: what the demo lets people upload (client/demo.py) and more than
# any camera's JPEG (a 50 MP photo at quality 95 is about 20 MB).
MAX_IMAGE_BYTES = 25 * 1024 * 1024
# What Pillow may open: the formats people upload (IMAGE_SUFFIXES). Without the list Pillow tries every
# plugin it has (EPS, PSD, FITS, ...): decoders nobody needs and more code for a hostile file to reach.
# MPO (multi-picture JPEGs that phones write) opens through the JPEG plugin.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF")
# File suffixes taken as images when a folder is scanned (the CLI, the export's calibration folder).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
# Fast path: a resize by a factor over REDUCING_GAP first shrinks the image by a whole factor with a
# box filter (Pillow's ``reduce``) to at least REDUCING_GAP x the target, then resamples as the exact
# path does. Pillow documents 3 as "indistinguishable from fair resampling in most cases"; on a
# 12 MP image it cuts the resize to 256 px from 34 ms to 14 ms (bench/studies/decoding.py measures what it changes).
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: the evaluation transform of the paper's recipe
    (docs/training.md)."""

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


# Why an image was refused, in a word a program can count on (ImageError.reason): a small fixed set,
# so a metric labelled with it stays bounded whatever the uploads are.
REJECT_REASONS = ("empty", "too_large", "too_small", "aspect_ratio", "not_an_image", "corrupt", "other")


class ImageError(ValueError):
    """An input that is not a usable image; the message says why, for people, and ``reason`` (one of
    :data:`REJECT_REASONS`) says it for programs (the server's rejected-uploads counter)."""

    def __init__(self, message: str = "", *, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason if reason in REJECT_REASONS else "other"


def check_size(
    width: int, height: int, resize: int | None = None, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT
) -> None:
    """Refuse, with the reason, an image whose decoding or resizing would cost too much; from the
    header's size alone, so nothing is decoded before the answer (what the server can afford per image).

    ``resize``: the shorter side is to be resized to this (the size of the intermediate is checked too).
    """
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"image is {width}x{height} pixels; both sides must be >= {MIN_SIDE}", reason="too_small")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (decompression bomb guard)",
            reason="too_large",
        )
    short, long = min(width, height), max(width, height)
    if long > max_aspect * short:
        ratio = f"{long / short:.2f}".rstrip("0").rstrip(".")
        raise ImageError(
            f"image is {width}x{height} pixels, an aspect ratio of {ratio}:1, over the limit of {max_aspect:g}:1",
            reason="aspect_ratio",
        )
    if resize is not None and resize * int(resize * long / short) > MAX_RESIZED_PIXELS:
        raise ImageError(
            f"image is {width}x{height} pixels: resized to a shorter side of {resize} it would be "
            f"{int(resize * long / short)} pixels long, over the limit of {MAX_RESIZED_PIXELS} pixels",
            reason="too_large",
        )


def _reason(e: BaseException, with_type: bool = False) -> str:
    """An exception's message as one short line (libraries' messages can run over several)."""
    text = " ".join(str(e).split())[:200]
    if with_type or not text:
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text


def open_image(
    source: bytes | str | os.PathLike,
    max_pixels: int = MAX_PIXELS,
    min_side: int | None = None,
    resize: int | None = None,
) -> Image.Image:
    """Decode bytes or a file into an RGB image, whatever its mode or format.

    Handles EXIF orientation, the first frame of animations, grayscale, palette, alpha,
    CMYK, 16-bit, progressive JPEG, HEIC/HEIF and AVIF images. Raises :class:`ImageError`
    for empty, corrupt, non-image, too large, too thin or too small inputs, and for any
    other failure of the decoders (malformed EXIF, ICC profiles...): whatever the bytes, the
    caller gets an ImageError, never another exception. The size checks (:func:`check_size`)
    read the header only, before any pixel is decoded; ``resize`` also bounds the shorter side
    resized to it.

    ``min_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    Pillow's ``draft``) as long as both sides stay >= ``min_side``; a 12 MP photo then
    decodes in about a quarter of the time (93 -> 26 ms here). Other formats decode at full size.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError("empty input: 0 bytes", reason="empty")
        if len(source) > MAX_IMAGE_BYTES:
            raise ImageError(f"image is {len(source)} bytes, over the limit of {MAX_IMAGE_BYTES}", reason="too_large")
        stream: Any = io.BytesIO(source)
    else:
        stream = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream, formats=FORMATS)
            check_size(*img.size, resize=resize, max_pixels=max_pixels)
            img.seek(0)  # first frame of GIF/WebP animations
            if min_side is not None:
                img.draft(None, (min_side, min_side))  # JPEG only; a no-op for every other format
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognized format)", reason="not_an_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large (decompression bomb guard): {e}", reason="too_large") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {_reason(e)}", reason="corrupt") from None
    except MemoryError:
        raise
    except Exception as e:  # a decoder's own bug on hostile bytes (KeyError, IndexError, struct.error...)
        raise ImageError(f"corrupt image: {_reason(e, with_type=True)}", reason="corrupt") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit and 32-bit grayscale are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        # Integer arithmetic (no float64 copy at 8 bytes a pixel): round(v / 257) is (v + 128) // 257,
        # as v / 257 is never exactly half-way for an integer v.
        arr = (np.asarray(img).astype(np.uint32) + 128) // 257
        img = Image.fromarray(arr.astype(np.uint8))
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int, fast: bool = False) -> Image.Image:
    """Shorter side to ``size`` with the aspect ratio kept, as torchvision's ``Resize(size)``;
    ``fast``: large reductions box-shrink first (see :data:`REDUCING_GAP`)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP if fast else None)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Central ``size x size`` crop with torchvision's rounding."""
    w, h = img.size
    if w < size or h < size:
        raise ImageError(f"image {w}x{h} is smaller than the {size}x{size} crop", reason="too_small")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, pp: Preprocessing = IMAGENET, fast: bool = False) -> np.ndarray:
    """RGB image to the model input: ``(crop, crop, 3)`` uint8, HWC."""
    return np.asarray(center_crop(resize_shorter(img, pp.resize, fast), pp.crop), dtype=np.uint8)


def load_and_preprocess(
    source: bytes | str | os.PathLike, pp: Preprocessing = IMAGENET, fast: bool = True
) -> np.ndarray:
    """Decode and preprocess in one step; raises :class:`ImageError` for bad input.

    ``fast`` (the default everywhere images are served or evaluated): JPEGs decoded at the
    smallest DCT scale that keeps the shorter side >= ``pp.resize``, large reductions
    box-shrunk first; ``fast=False``: full decode and torchvision's exact resize."""
    return preprocess(open_image(source, min_side=pp.resize if fast else None, resize=pp.resize), pp, fast)
