"""Image decoding and preprocessing: exactly torchvision's eval transform, robust to bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import decoder_regressions, encode, format_seeds, mutations, noise_image, thin_png, with_exif
from photos import photos
from PIL import Image, ImageCms
from torchvision import transforms

from threegnet_preprocessing import (
    MAX_ASPECT,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    MAX_RESIZED_PIXELS,
    ImageError,
    Preprocessing,
    check_size,
    load_and_preprocess,
    open_image,
    preprocess,
)


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


def test_a_palette_image_with_transparency_becomes_rgb():
    src = noise_image(32, 32).convert("P")
    src.info["transparency"] = 0
    assert open_image(encode(src, "PNG", transparency=0)).mode == "RGB"


def test_an_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert open_image(data).getpixel((5, 5))[0] > 200  # red, not blue


def test_exif_orientation_is_applied():
    src = noise_image(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = open_image(encode(src, "JPEG", exif=exif))
    assert img.size == (40, 60)


def test_an_image_file_path_is_read_like_its_bytes(tmp_path):
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
def test_empty_and_non_image_bytes_are_refused_with_the_reason(data, message):
    with pytest.raises(ImageError, match=message):
        open_image(data)


def test_a_truncated_jpeg_is_refused_as_corrupt_or_truncated():
    data = encode(noise_image(200, 200), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(data[: len(data) // 2])


def test_a_one_pixel_image_is_refused_with_its_size():
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


# -- hostile uploads: the work is bounded from the header, and every decoder failure is an ImageError --


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any pixel is decoded: the refusal must come from the header alone."""
    from PIL import ImageFile

    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    yield
    assert decoded == [], f"pixels decoded before the refusal: {decoded}"


@pytest.mark.parametrize("size", [(8, 100_000), (250_000, 8), (100, 2_500)])
def test_thin_images_are_refused_from_the_header(size, no_decoding):
    with pytest.raises(ImageError, match=r"aspect ratio of [\d.]+:1, over the limit of 20:1"):
        load_and_preprocess(thin_png(*size), Preprocessing(resize=73, crop=64))


def test_the_aspect_limit_keeps_panoramas_and_long_screenshots():
    assert load_and_preprocess(thin_png(16, 16 * 20), Preprocessing(resize=73, crop=64)).shape == (64, 64, 3)
    assert load_and_preprocess(thin_png(4000, 1000)).shape == (224, 224, 3)  # a 4:1 phone panorama
    with pytest.raises(ImageError, match="aspect ratio"):
        open_image(thin_png(16, 16 * 20 + 1))


def test_the_resized_intermediate_is_bounded(no_decoding):
    # 10:1 is a fine aspect ratio, but resizing its shorter side to 2000 would make 2000 x 20000 pixels.
    with pytest.raises(ImageError, match=r"resized to a shorter side of 2000 it would be 20000 pixels long"):
        load_and_preprocess(thin_png(100, 1000), Preprocessing(resize=2000, crop=224))


def test_check_size_names_each_limit():
    check_size(4032, 3024, resize=256)  # a camera photo
    check_size(8200, 410, resize=256)  # 20:1 exactly
    for args, reason in [
        ((7, 100), "both sides must be >= 8"),
        ((8193, 8192), "decompression bomb guard"),
        ((21, 420 + 1), "aspect ratio"),
        ((1000, 10_000, 4096), "over the limit of"),
    ]:
        with pytest.raises(ImageError, match=reason):
            check_size(*args)
    assert MAX_ASPECT * 256 * 256 <= MAX_RESIZED_PIXELS  # the usual resize never hits the second bound


def test_oversized_encoded_bytes_are_refused_unread():
    with pytest.raises(ImageError, match=f"over the limit of {MAX_IMAGE_BYTES}"):
        open_image(b"\xff\xd8\xff" + bytes(MAX_IMAGE_BYTES))


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "PPM", "SGI", "EPS"])
def test_formats_nobody_uploads_are_not_decoded(fmt):
    img = noise_image(32, 32).convert("L" if fmt == "EPS" else "RGB")
    try:
        data = encode(img, fmt)
    except OSError:  # EPS needs Ghostscript to write; its header alone is enough here
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
    with pytest.raises(ImageError, match="not an image"):
        open_image(data)


@pytest.mark.parametrize("name", sorted(decoder_regressions()))
def test_decoder_failures_on_malformed_files_are_image_errors(name):
    with pytest.raises(ImageError) as e:
        load_and_preprocess(decoder_regressions()[name], Preprocessing(resize=73, crop=64))
    assert "\n" not in str(e.value) and "/" not in str(e.value)  # one line, no paths


def test_exif_and_icc_that_parse_still_apply():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ("JPEG", "PNG", "WEBP", "AVIF"):  # (pillow-heif turns HEIC by the container's own rotation)
        assert open_image(with_exif(fmt, exif, icc_profile=icc)).size == (40, 56), fmt


@pytest.mark.parametrize("fmt", sorted(format_seeds()))
def test_mutated_files_of_every_format_only_ever_raise_image_errors(fmt):
    """About 240 damaged copies of each format through the served decode path: each either decodes
    to the model input or raises ImageError with a one-line reason; nothing else escapes."""
    pp = Preprocessing(resize=73, crop=64)
    outcomes = {"decoded": 0, "refused": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the EXIF it skips
        for data in mutations(format_seeds()[fmt], seed=sum(fmt.encode()), count=200):
            try:
                assert load_and_preprocess(data, pp).shape == (64, 64, 3)
                outcomes["decoded"] += 1
            except ImageError as e:
                assert "\n" not in str(e) and "Traceback" not in str(e)
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes
