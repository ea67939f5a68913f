"""Image decoding and preprocessing: exactly torchvision's eval transform, robust to bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from photos import photos
from PIL import Image
from torchvision import transforms

from threegnet_preprocessing import (
    MAX_PIXELS,
    ImageError,
    Preprocessing,
    load_and_preprocess,
    open_image,
    preprocess,
)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (300, 200), (200, 301), (513, 257), (31, 40), (1000, 999)])
def test_matches_torchvision_resize_and_center_crop_exactly(size):
    img = noise_image(*size, seed=size[0])
    ref = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(img)
    np.testing.assert_array_equal(preprocess(img), np.asarray(ref))


def test_other_sizes_follow_the_preprocessing_record():
    img = noise_image(150, 90)
    pp = Preprocessing(resize=80, crop=64)
    ref = transforms.Compose([transforms.Resize(80), transforms.CenterCrop(64)])(img)
    np.testing.assert_array_equal(preprocess(img, pp), np.asarray(ref))
    assert Preprocessing.from_dict(pp.to_dict()) == pp


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_formats_decode_to_rgb(fmt):
    img = open_image(encode(noise_image(64, 48), fmt))
    assert img.mode == "RGB" and img.size == (64, 48)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_modes_become_rgb(mode):
    if mode == "I;16":
        arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
        src = Image.fromarray(arr)
        assert src.mode == "I;16"
    else:
        src = noise_image(64, 48).convert(mode)
    img = open_image(encode(src, "TIFF" if mode == "CMYK" else "PNG"))
    assert img.mode == "RGB" and img.size == (64, 48)
    if mode == "I;16":  # scaled from 16 to 8 bits, not clipped at 255
        out = np.asarray(img)[..., 0].astype(int)
        assert out.max() > 200 and abs(out[-1, -1] - round(int(arr[-1, -1]) / 257)) <= 1


def test_palette_with_transparency():
    src = noise_image(32, 32).convert("P")
    src.info["transparency"] = 0
    assert open_image(encode(src, "PNG", transparency=0)).mode == "RGB"


def test_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert open_image(data).getpixel((5, 5))[0] > 200  # red, not blue


def test_exif_orientation_is_applied():
    src = noise_image(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = open_image(encode(src, "JPEG", exif=exif))
    assert img.size == (40, 60)


def test_path_input(tmp_path):
    path = tmp_path / "a.png"
    noise_image(300, 260).save(path)
    assert load_and_preprocess(path).shape == (224, 224, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"this is not an image at all", "not an image"),
        (b"%PDF-1.4 fake", "not an image"),
    ],
)
def test_bad_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        open_image(data)


def test_truncated_jpeg():
    data = encode(noise_image(200, 200), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(data[: len(data) // 2])


def test_tiny_image():
    with pytest.raises(ImageError, match="1x1 pixels"):
        open_image(encode(Image.new("RGB", (1, 1))))


def test_decompression_bomb_is_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 16
    data = encode(Image.new("1", (side, side)), "PNG")  # a tiny file that decodes to 68 Mpx
    assert len(data) < 200_000
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(data)


def test_decompression_bomb_is_refused_before_the_fast_decoder_too():
    side = int(MAX_PIXELS**0.5) + 16
    data = encode(Image.new("L", (side, 16)).resize((side, side)), "JPEG", quality=5)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_and_preprocess(data)  # fast: draft mode, still checked on the header first


# -- the files people upload (tests/photos.py builds each) and the fast decoding path -----------------

PHOTOS = {p.name: p for p in photos()}


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_uploaded_formats_decode_to_what_a_viewer_shows(name):
    photo = PHOTOS[name]
    img = open_image(photo.data)
    assert img.mode == "RGB"
    assert img.size == (photo.expected.shape[1], photo.expected.shape[0])  # EXIF rotation applied
    error = np.abs(np.asarray(img, dtype=np.float64) - photo.expected).mean()
    assert error <= photo.tolerance, f"{name}: mean |Δ| {error:.2f} over {photo.tolerance}"


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_uploaded_formats_preprocess_fast_close_to_exact(name):
    photo = PHOTOS[name]
    fast, exact = load_and_preprocess(photo.data), load_and_preprocess(photo.data, fast=False)
    assert fast.shape == exact.shape == (224, 224, 3)
    assert np.abs(fast.astype(int) - exact).mean() < 2.0


def test_a_camera_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_resize():
    data = PHOTOS["camera_jpeg"].data  # 4032 x 3024
    assert open_image(data, min_side=256).size == (504, 378)  # 1/8: 378 >= 256
    assert open_image(data, min_side=400).size == (1008, 756)  # 1/4: 1/8 would leave 378 < 400
    assert open_image(data, min_side=3024).size == (4032, 3024)
    assert open_image(data).size == (4032, 3024)


def test_the_exact_path_is_still_torchvisions():
    img = noise_image(3200, 2400)  # 9.4x down to 341x256: over REDUCING_GAP, so the fast path pre-shrinks
    ref = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(img)
    np.testing.assert_array_equal(load_and_preprocess(encode(img, "PNG"), fast=False), np.asarray(ref))
    assert not np.array_equal(load_and_preprocess(encode(img, "PNG")), np.asarray(ref))  # box pre-shrink
