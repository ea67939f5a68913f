"""The built-in texture dataset: deterministic, ImageFolder-shaped, and second-order by construction."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.synthetic import CLASS_NAMES, generate, main


def _files(root):
    return sorted(p for p in root.rglob("*.png"))


def _load(root, split):
    """Images (N, H, W, 3) float and labels, classes in ImageFolder (sorted) order."""
    images, labels = [], []
    for label, folder in enumerate(sorted((root / split).iterdir())):
        for f in sorted(folder.iterdir()):
            images.append(np.asarray(Image.open(f), dtype=np.float64))
            labels.append(label)
    return np.stack(images), np.array(labels)


def _nearest_centroid(train_x, train_y, test_x, test_y) -> float:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-9
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    centroids = np.stack([train_x[train_y == k].mean(0) for k in np.unique(train_y)])
    predicted = ((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((predicted == test_y).mean())


def _mean_colour(images):
    return images.mean(axis=(1, 2))


def _second_order(images):
    """Colour correlations and the normalized gradient structure tensor: a few covariance numbers."""
    feats = []
    for img in images:
        flat = (img - img.mean(axis=(0, 1))).reshape(-1, 3)
        cov = flat.T @ flat / len(flat)
        sd = np.sqrt(np.diag(cov))
        corr = (cov / np.outer(sd, sd))[np.triu_indices(3, 1)]
        grey = img.mean(axis=2)
        gy, gx = np.gradient(grey)
        tensor = np.array([(gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()]) / (grey.var() + 1e-9)
        feats.append(np.r_[corr, tensor, np.log(tensor[:2])])
    return np.array(feats)


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("tex"), classes=8, per_class=30, val_per_class=15, size=64, seed=3)


def test_each_split_has_a_folder_per_class_of_numbered_rgb_pngs(tmp_path):
    root = generate(tmp_path / "d", classes=3, per_class=4, val_per_class=2, size=32, progress=False)
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CLASS_NAMES[:3])
        for folder in (root / split).iterdir():
            files = sorted(folder.iterdir())
            assert [f.name for f in files] == [f"{folder.name}_{i:04d}.png" for i in range(n)]
            img = Image.open(files[0])
            assert (img.mode, img.size) == ("RGB", (32, 32))


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = generate(tmp_path / "a", classes=3, per_class=3, size=32, seed=7, progress=False)
    b = generate(tmp_path / "b", classes=3, per_class=3, size=32, seed=7, progress=False)
    c = generate(tmp_path / "c", classes=3, per_class=3, size=32, seed=8, progress=False)
    assert [f.read_bytes() for f in _files(a)] == [f.read_bytes() for f in _files(b)]
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(_files(a), _files(c), strict=True))


def test_fewer_classes_give_the_same_images_of_those_classes(tmp_path):
    small = generate(tmp_path / "s", classes=2, per_class=2, size=32, progress=False)
    large = generate(tmp_path / "l", classes=4, per_class=2, size=32, progress=False)
    for f in _files(small):
        assert f.read_bytes() == (large / f.relative_to(small)).read_bytes()


def test_mean_colour_is_at_chance_while_second_order_statistics_separate_the_classes(textures):
    train_x, train_y = _load(textures, "train")
    val_x, val_y = _load(textures, "val")
    chance = 1 / 8
    by_mean = _nearest_centroid(_mean_colour(train_x), train_y, _mean_colour(val_x), val_y)
    by_texture = _nearest_centroid(_second_order(train_x), train_y, _second_order(val_x), val_y)
    assert by_mean < chance + 0.1, by_mean
    assert by_texture > 0.75, by_texture
    # Overall brightness and contrast are no giveaway either.
    brightness = np.array([[x.mean(), x.std()] for x in train_x])
    per_class = np.stack([brightness[train_y == k].mean(0) for k in range(8)])
    assert np.ptp(per_class[:, 0]) < 25 and np.ptp(per_class[:, 1]) < 8, per_class


def test_cli_writes_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "tex"
    assert main([str(out), "--classes", "2", "--per-class", "2", "--size", "24", "--no-progress"]) == 0
    assert "2 classes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([str(out), "--classes", "2", "--per-class", "2", "--size", "24", "--no-progress"])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    (out / "train" / "stale").mkdir()
    args = [str(out), "--classes", "3", "--per-class", "1", "--size", "24", "--overwrite", "--no-progress"]
    assert main(args) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(CLASS_NAMES[:3])


@pytest.mark.parametrize("flags", [["--classes", "1"], ["--classes", "99"], ["--size", "8"], ["--per-class", "0"]])
def test_cli_rejects_bad_sizes(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "x"), "--no-progress", *flags])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["horizontal_fine", "maze", "grey_blobs"])
def test_periods_grow_with_the_image_size(name):
    """A 256 px image shows the texture of a 128 px one, twice as large (and a 64 px one, half)."""
    from training.synthetic import CLASSES, image_rng, render

    cls = next(c for c in CLASSES if c.name == name)

    def period_px(size: int) -> float:
        """The dominant wavelength in pixels: 1 / the power-weighted mean spatial frequency."""
        powers, weights = [], []
        for i in range(6):
            grey = render(cls, size, image_rng(0, "train", 0, i)).astype(np.float64).mean(axis=2)
            power = np.abs(np.fft.rfft2(grey - grey.mean())) ** 2
            freq = np.hypot(np.fft.rfftfreq(size)[None, :], np.fft.fftfreq(size)[:, None])
            powers.append((power * freq).sum())
            weights.append(power.sum())
        return sum(weights) / sum(powers)

    p64, p128, p256 = period_px(64), period_px(128), period_px(256)
    assert 1.7 < p128 / p64 < 2.3 and 1.7 < p256 / p128 < 2.3, (p64, p128, p256)
