"""The files people upload, built here from one picture: camera-sized and progressive JPEGs,
CMYK JPEG, HEIC, AVIF, 16-bit PNG, a large PNG screenshot, an EXIF-rotated photo.

Each comes with what a photo viewer shows for it (``Photo.expected``, RGB uint8), so a
test can check the decoded pixels and not only that decoding did not fail.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()  # to write HEIC here; the decoder registers it by itself


@dataclass(frozen=True)
class Photo:
    name: str
    suffix: str
    data: bytes
    expected: np.ndarray  # (H, W, 3) uint8: the image as displayed
    tolerance: float  # mean |decoded - expected| allowed (lossy formats lose some)


def scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric colour picture (lossy codecs keep it well; a flip or a rotation shows):
    a red quadrant top left, blue bottom right, soft waves elsewhere."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy = rng.uniform(2, 6, 2)
    base = np.stack(
        [
            128 + 60 * np.sin(2 * np.pi * fx * x / width),
            128 + 60 * np.cos(2 * np.pi * fy * y / height),
            128 + 50 * np.sin(2 * np.pi * (x + y) / (width + height) * 3),
        ],
        axis=-1,
    )
    base[: height // 3, : width // 3] = (220, 30, 30)
    base[-height // 3 :, -width // 3 :] = (30, 30, 220)
    return np.clip(base, 0, 255).astype(np.uint8)


def _save(pixels: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def png16(pixels16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): the chunks written by hand."""
    h, w, _ = pixels16.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + pixels16[r].astype(">u2").tobytes() for r in range(h))  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, truecolour
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def screenshot(width: int = 2560, height: int = 1600) -> np.ndarray:
    """Flat panels and thin 'text' lines: what a large PNG screenshot holds (4 MP)."""
    pixels = np.full((height, width, 3), 245, np.uint8)
    pixels[:60] = (40, 44, 52)  # a title bar
    pixels[60:, :320] = (230, 232, 236)  # a side panel
    for row in range(100, height - 40, 28):  # lines of text
        length = 400 + (row * 37) % (width - 800)
        pixels[row : row + 3, 360 : 360 + length] = (30, 30, 30)
    pixels[200:700, 1400:2300] = scene(900, 500, seed=5)  # a picture in the page
    return pixels


def photos(size: tuple[int, int] = (640, 480), camera: tuple[int, int] = (4032, 3024)) -> list[Photo]:
    """One file of each kind; ``size`` for the small ones, ``camera`` for the 12 MP JPEG."""
    w, h = size
    pixels = scene(w, h)
    # EXIF orientation 6: the sensor's pixels are stored turned 90 degrees counter-clockwise, and
    # the viewer turns them back clockwise; what it shows is `pixels`.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(pixels, 1))
    cam = scene(*camera, seed=1)
    deep = scene(w, h, seed=2).astype(np.uint16) * 257 + 128  # 16 bits, low byte not all zero
    shot = screenshot()
    cmyk = Image.fromarray(pixels).convert("CMYK")
    return [
        Photo("camera_jpeg", ".jpg", _save(cam, "JPEG", quality=90), cam, 2.0),
        Photo("progressive_jpeg", ".jpg", _save(pixels, "JPEG", quality=90, progressive=True), pixels, 2.0),
        Photo("cmyk_jpeg", ".jpg", _save(cmyk, "JPEG", quality=95), np.asarray(cmyk.convert("RGB")), 3.0),
        Photo("heic", ".heic", _save(pixels, "HEIF", quality=90), pixels, 3.0),
        Photo("avif", ".avif", _save(pixels, "AVIF", quality=90), pixels, 3.0),
        Photo("png_16bit", ".png", png16(deep), (deep >> 8).astype(np.uint8), 0.01),
        Photo("large_png_screenshot", ".png", _save(shot, "PNG"), shot, 0.0),
        Photo("exif_rotated_jpeg", ".jpg", _save(stored, "JPEG", quality=95, exif=exif), pixels, 2.0),
    ]
