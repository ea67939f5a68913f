"""ImageFolder data: up-front checks with clear messages, bad files skipped, every image mode to RGB."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from threegnet_preprocessing import Preprocessing, load_and_preprocess, preprocess
from training.data import (
    DataError,
    ImageFolderData,
    Unreadable,
    check_classes,
    collate_skipping,
    eval_transform,
    train_transform,
)
from training.distributed import ShardSampler
from training.synthetic import generate

PP = Preprocessing(resize=40, crop=32)


def _noise(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def tiny(tmp_path):
    return generate(tmp_path / "data", classes=3, per_class=2, val_per_class=1, size=32, progress=False)


def test_classes_are_sorted_and_shared(tiny):
    assert check_classes(tiny, ("train", "val")) == ["diagonal_coarse", "horizontal_fine", "vertical_fine"]


def test_a_missing_root_or_split_is_named(tiny):
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist"):
        check_classes(tiny / "nowhere", ("train", "val"))
    (tiny / "val").rename(tiny / "validation")
    with pytest.raises(DataError, match=r"val does not exist \(expected ROOT/train/<class>"):
        check_classes(tiny, ("train", "val"))


def test_different_class_lists_are_spelled_out(tiny):
    (tiny / "train" / "extra").mkdir()
    with pytest.raises(DataError, match=r"train and val have different class folders \(only in train: extra\)"):
        check_classes(tiny, ("train", "val"))
    (tiny / "val" / "horizontal_fine").rename(tiny / "val" / "x")
    with pytest.raises(DataError, match=r"only in train: extra, horizontal_fine; only in val: x"):
        check_classes(tiny, ("train", "val"))


def test_a_split_without_class_folders_is_refused_with_its_name(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "readme.txt").write_text("no folders here")
    with pytest.raises(DataError, match=r"train has no class folders"):
        check_classes(tmp_path, ("train",))


def test_an_empty_class_folder_is_named(tiny):
    folder = tiny / "train" / "vertical_fine"
    for f in folder.iterdir():
        f.unlink()
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"train/vertical_fine holds no image files"):
        ImageFolderData(tiny / "train", check_classes(tiny, ("train", "val")), eval_transform(PP))


def test_nested_files_and_other_extensions_are_found(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    _noise().save(tmp_path / "a" / "deep" / "x.JPEG")
    _noise().save(tmp_path / "b" / "y.webp")
    (tmp_path / "b" / ".hidden.png").write_bytes(b"")
    data = ImageFolderData(tmp_path, ["a", "b"], eval_transform(PP))
    assert [(p.rsplit("/", 1)[1], t) for p, t in data.samples] == [("x.JPEG", 0), ("y.webp", 1)]


def test_the_formats_people_have_are_trained_on(tmp_path):
    """HEIC, AVIF, progressive/CMYK JPEG, 16-bit PNG, EXIF-rotated: found by the scan and decoded as displayed."""
    from photos import photos

    folder = tmp_path / "c"
    folder.mkdir()
    made = photos(size=(64, 48), camera=(320, 240))
    for photo in made:
        (folder / f"{photo.name}{photo.suffix}").write_bytes(photo.data)
    data = ImageFolderData(tmp_path, ["c"], eval_transform(PP))
    assert sorted(p.rsplit("/", 1)[1] for p, _ in data.samples) == sorted(f"{p.name}{p.suffix}" for p in made)
    assert {p.suffix for p in made} >= {".heic", ".avif"}
    by_name = {p.rsplit("/", 1)[1]: i for i, (p, _) in enumerate(data.samples)}
    for photo in made:
        image, target = data[by_name[f"{photo.name}{photo.suffix}"]]
        assert image.shape == (3, 32, 32) and target == 0, photo.name
        expected = eval_transform(PP)(Image.fromarray(photo.expected))
        assert (image - expected).abs().mean() <= photo.tolerance / 255 / min(PP.std) + 0.05, photo.name


def test_every_image_mode_becomes_three_channels(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    rgb = _noise()
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("P").save(folder / "palette.png")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(folder / "sixteen.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    data = ImageFolderData(tmp_path, ["c"], eval_transform(PP))
    for i in range(len(data)):
        image, target = data[i]
        assert image.shape == (3, 32, 32) and target == 0


def test_unreadable_files_are_dropped_and_reported(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    _noise().save(folder / "good.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not a png at all")
    good = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    data = ImageFolderData(tmp_path, ["c"], eval_transform(PP))
    items = [data[i] for i in range(len(data))]
    batch = collate_skipping(items)
    assert len(batch) == 1 and batch.images.shape == (1, 3, 32, 32)
    assert sorted(u.path for u in batch.skipped) == ["c/empty.jpg", "c/text.png", "c/truncated.png"]
    assert all(u.reason for u in batch.skipped)
    empty = collate_skipping([Unreadable("x", "corrupt")])
    assert len(empty) == 0 and len(empty.skipped) == 1


def test_eval_transform_is_the_serving_preprocessing():
    img = _noise((57, 45), seed=1)
    expected = torch.tensor(preprocess(img, PP)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(PP.mean)[:, None, None], torch.tensor(PP.std)[:, None, None]
    torch.testing.assert_close(eval_transform(PP)(img), (expected - mean) / std)


def test_evaluation_decodes_large_photos_as_the_server_does(tmp_path):
    """A camera-sized JPEG takes the served fast path in evaluation too (reduced DCT scale,
    box pre-shrink), so validation accuracy is the served model's accuracy."""
    (tmp_path / "c").mkdir()
    path = tmp_path / "c" / "photo.jpg"
    _noise((32, 24), seed=3).resize((1600, 1200), Image.Resampling.BICUBIC).save(path, quality=90)
    sample, _ = ImageFolderData(tmp_path, ["c"], eval_transform(PP), min_side=PP.resize)[0]
    served = torch.tensor(load_and_preprocess(path, PP)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(PP.mean)[:, None, None], torch.tensor(PP.std)[:, None, None]
    torch.testing.assert_close(sample, (served - mean) / std)
    exact = torch.tensor(load_and_preprocess(path, PP, fast=False)).permute(2, 0, 1).float() / 255
    assert not torch.equal(served, exact)  # the fast path did take effect on this image


def test_ten_crop_gives_ten_crops_whose_fifth_is_the_centre_crop_and_train_crops_have_the_crop_size():
    img = _noise((57, 45), seed=2)
    crops = eval_transform(PP, ten_crop=True)(img)
    assert crops.shape == (10, 3, 32, 32)
    torch.testing.assert_close(crops[4], eval_transform(PP)(img))  # TenCrop's 5th crop is the centre one
    assert train_transform(PP, min_scale=0.5)(img).shape == (3, 32, 32)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_sample_once(world):
    shards = [list(ShardSampler(10, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(ShardSampler(10, rank, world)) for rank in range(world)] == [len(s) for s in shards]
