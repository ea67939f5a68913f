"""Checkpoints: the released format, this project's format, and bad files."""

from __future__ import annotations

import pytest
import torch
from helpers import released_checkpoint

from threegnet_preprocessing import Preprocessing
from training.checkpoint import CheckpointError, load_model, make_checkpoint, save_atomic
from training.model import create_model


def test_released_checkpoint_loads_with_inferred_arch_and_classes(tmp_path):
    path = tmp_path / "ResNet50-3G-ImageNet.pth.tar"
    ref = released_checkpoint(path, "resnet50_3g", 1000)
    loaded = load_model(path)
    assert (loaded.arch, loaded.num_classes, loaded.released) == ("resnet50_3g", 1000, True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x))


def test_released_places365_checkpoint_infers_365_classes(tmp_path):
    path = tmp_path / "r18.pth.tar"
    released_checkpoint(path, "resnet18_3g", 365)
    assert load_model(path).num_classes == 365


def test_own_checkpoint_carries_its_metadata(tmp_path):
    model = create_model("resnet18_3g", num_classes=3, dim=32, num_stages=2)
    pp = Preprocessing(resize=80, crop=64)
    ckpt = make_checkpoint(
        model,
        arch="resnet18_3g",
        class_names=["a", "b", "c"],
        preprocessing=pp,
        args={"lr": 0.1, "data": tmp_path},
        epoch=4,
        metrics={"top1": 55.0},
    )
    path = save_atomic(ckpt, tmp_path / "ck.pth.tar")
    loaded = load_model(path)
    assert loaded.class_names == ["a", "b", "c"]
    assert loaded.preprocessing == pp
    assert loaded.model_kwargs == {"num_stages": 2, "dim": 32, "iterations": 5}
    assert loaded.raw["epoch"] == 4 and loaded.raw["metrics"] == {"top1": 55.0}
    assert loaded.raw["args"]["data"] == str(tmp_path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_missing_checkpoint_file_is_named_as_missing(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth\.tar: no such file"):
        load_model(tmp_path / "nope.pth.tar")


def test_a_file_that_is_no_checkpoint_is_named_as_unreadable(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a readable PyTorch checkpoint"):
        load_model(path)


def test_a_truncated_checkpoint_is_named_as_unreadable(tmp_path):
    path = tmp_path / "cut.pth.tar"
    released_checkpoint(path)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"cut\.pth\.tar: not a readable PyTorch checkpoint"):
        load_model(path)


def test_a_checkpoint_holding_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "hook": print}, path)  # weights_only=True refuses a function
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        load_model(path)


def test_a_state_dict_of_another_model_is_refused_as_not_a_3g_net(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"resnet\.pth: not a 3G-Net state dict"):
        load_model(path)


def test_arch_mismatch_names_the_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "r18.pth.tar"
    released_checkpoint(path, "resnet18_3g", 10)
    with pytest.raises(CheckpointError) as info:
        load_model(path, arch="resnet50_3g")
    msg = str(info.value)
    assert "r18.pth.tar" in msg and "resnet50_3g" in msg
    assert "missing keys: layer1.0.conv3.weight" in msg
    assert "shape mismatches" in msg


def test_a_class_count_other_than_the_checkpoints_names_both_fc_shapes(tmp_path):
    path = tmp_path / "r18.pth.tar"
    released_checkpoint(path, "resnet18_3g", 10)
    with pytest.raises(CheckpointError, match=r"fc\.weight: checkpoint \(10, 32896\) vs model \(5, 32896\)"):
        load_model(path, num_classes=5)
