"""The training script on built-in data: checkpoints, resume, evaluation, fine-tuning, bad input.

Runs go through ``training.train.main`` in this process (the script's ``__main__`` only
calls it) on a few 32 px images; one test runs the real command line as a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from threegnet_preprocessing import Preprocessing
from training.checkpoint import load_model
from training.model import create_model
from training.synthetic import generate
from training.train import main, parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--arch", "resnet18_3g", "--dim", "16", "--batch-size", "4", "--lr", "0.05",
    "--image-size", "32", "--resize", "36", "--workers", "0", "--no-progress",
]  # fmt: skip


def make_data(root: Path, classes: int = 3, per_class: int = 6, val_per_class: int = 2) -> Path:
    return generate(root, classes=classes, per_class=per_class, val_per_class=val_per_class, size=32, progress=False)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def released_checkpoint(path: Path, num_classes: int, **model_kwargs) -> torch.nn.Module:
    """The authors' format: a DataParallel state dict (``module.`` keys) and their dict entries."""
    torch.manual_seed(1)
    model = create_model("resnet18_3g", num_classes=num_classes, **model_kwargs)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DataParallel saves it
    torch.save({"epoch": 115, "arch": "resnet18", "state_dict": state, "best_prec1": 70.0}, path)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "tex")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """Output folder of a 2-epoch run whose lr drops after epoch 1."""
    out = tmp_path_factory.mktemp("run")
    assert main([str(data), *TINY, "--epochs", "2", "--lr-steps", "1", "--output-dir", str(out)]) == 0
    return out


def test_recipes_give_the_released_schedules_and_flags_override_them(tmp_path):
    imagenet = parse_args([str(tmp_path)])
    assert (imagenet.epochs, imagenet.lr_steps, imagenet.lr, imagenet.momentum) == (115, [30, 60, 90], 0.1, 0.9)
    assert (imagenet.weight_decay, imagenet.batch_size, imagenet.lr_gamma) == (1e-4, 256, 0.1)
    places = parse_args([str(tmp_path), "--recipe", "places365"])
    assert (places.epochs, places.lr_steps) == (55, [30, 40, 45, 50])
    mine = parse_args([str(tmp_path), "--recipe", "places365", "--epochs", "3", "--lr", "0.2", "--lr-steps", "2"])
    assert (mine.epochs, mine.lr, mine.lr_steps, mine.batch_size) == (3, 0.2, [2], 256)


def test_a_run_writes_loadable_checkpoints_and_one_metrics_line_per_epoch(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["checkpoint.pth.tar", "metrics.jsonl", "model_best.pth.tar"]
    ckpt = torch.load(trained / "checkpoint.pth.tar", weights_only=True)
    best = torch.load(trained / "model_best.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["lr_scheduler"]["last_epoch"] == 2
    assert {"optimizer", "lr_scheduler", "scaler", "best_top1"} <= set(ckpt)
    assert not {"optimizer", "lr_scheduler", "scaler"} & set(best)
    loaded = load_model(trained / "checkpoint.pth.tar")
    assert loaded.class_names == ["diagonal_coarse", "horizontal_fine", "vertical_fine"]
    assert loaded.preprocessing == Preprocessing(resize=36, crop=32)
    assert (loaded.arch, loaded.model_kwargs["dim"], loaded.model_kwargs["num_stages"]) == ("resnet18_3g", 16, 3)
    assert load_model(trained / "model_best.pth.tar").num_classes == 3
    lines = metrics(trained)
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert {"lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s", "time_s"} <= set(
            m
        )
        assert (m["train_images"], m["val_images"], m["skipped"]) == (18, 6, 0)
    assert ckpt["best_top1"] == pytest.approx(max(m["val_top1"] for m in lines), abs=1e-3)


def test_resume_continues_the_restored_schedule_to_more_epochs(data, trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    args = [str(data), *TINY, "--epochs", "3", "--lr-steps", "2", "--output-dir", str(out)]
    assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "after epoch 2" in printed
    assert "the lr schedule is the checkpoint's (x0.1 after epochs [1])" in printed
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 3
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3]
    assert [m["lr"] for m in metrics(out)] == pytest.approx([0.05, 0.005, 0.005])
    assert main([*args, "--resume", str(out / "checkpoint.pth.tar")]) == 0  # nothing left to do
    assert "already has 3 of 3 epochs" in capsys.readouterr().out


@pytest.mark.parametrize("ten_crop", [False, True])
def test_evaluate_prints_one_json_line(data, trained, capsys, ten_crop):
    flags = ["--ten-crop"] if ten_crop else []
    assert main([str(data), *TINY, "--evaluate", "--resume", str(trained / "model_best.pth.tar"), *flags]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_images"] == 6 and 0 <= result["val_top1"] <= 100
    assert result["protocol"] == f"{'10' if ten_crop else '1'}-crop 32 of 36"


def test_resume_with_other_model_flags_or_released_weights_is_refused(data, trained, tmp_path, capsys):
    assert main([str(data), *TINY, "--dim", "32", "--resume", str(trained / "checkpoint.pth.tar")]) == 2
    assert "--dim 32 (checkpoint: 16)" in capsys.readouterr().err
    released = tmp_path / "R18-3G.pth.tar"
    released_checkpoint(released, 3, dim=16)
    assert main([str(data), *TINY, "--resume", str(released)]) == 2
    assert "use --finetune" in capsys.readouterr().err


def test_finetune_a_released_checkpoint_with_a_frozen_backbone(data, tmp_path, capsys):
    released = tmp_path / "ResNet18-3G.pth.tar"
    source = released_checkpoint(released, 10, dim=16).state_dict()
    out = tmp_path / "ft"
    args = [str(data), *TINY, "--finetune", str(released), "--freeze-backbone", "--epochs", "1"]
    assert main([*args, "--output-dir", str(out)]) == 0
    assert "fine-tuning resnet18_3g" in capsys.readouterr().out
    tuned = load_model(out / "checkpoint.pth.tar")
    assert tuned.num_classes == 3 and tuned.model.fc.in_features == 16 * 17 // 2
    state = tuned.model.state_dict()
    backbone = [k for k in source if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]
    assert any("running_mean" in k for k in backbone)
    for key in backbone:  # weights and BatchNorm statistics alike
        torch.testing.assert_close(state[key], source[key], msg=key)
    assert not torch.equal(state["layer_reduce.weight"], source["layer_reduce.weight"])
    assert not torch.equal(state["AtMp1.map1.weight"], source["AtMp1.map1.weight"])


def test_finetune_lets_the_backbone_learn_too(data, tmp_path):
    released = tmp_path / "r.pth.tar"
    source = released_checkpoint(released, 5, dim=16).state_dict()
    out = tmp_path / "ft"
    assert main([str(data), *TINY, "--finetune", str(released), "--epochs", "1", "--output-dir", str(out)]) == 0
    state = load_model(out / "checkpoint.pth.tar").model.state_dict()
    assert not torch.equal(state["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    assert main([str(data), *TINY, "--arch", "resnet50_3g", "--finetune", str(released)]) == 2


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last(data, tmp_path, amp):
    out = tmp_path / amp
    args = [str(data), *TINY, "--epochs", "1", "--amp", amp, "--channels-last", "--output-dir", str(out)]
    assert main([*args, "--max-steps-per-epoch", "2"]) == 0
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert metrics(out)[0]["train_images"] == 8  # 2 steps of 4
    assert ("scale" in ckpt["scaler"]) == (amp == "fp16")
    assert torch.isfinite(torch.tensor(metrics(out)[0]["val_loss"]))


def test_unreadable_images_are_skipped_with_a_count(data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    (root / "train" / "vertical_fine" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "val" / "vertical_fine" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "run"
    assert main([str(root), *TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: skipped 1 unreadable image(s) in train (e.g. vertical_fine/broken.png" in printed
    assert "warning: skipped 1 unreadable image(s) in val (e.g. vertical_fine/empty.jpg" in printed
    (line,) = metrics(out)
    assert (line["train_images"], line["val_images"], line["skipped"]) == (18, 6, 2)


def _break(root: Path, how: str) -> tuple[Path, list[str]]:
    """A broken copy of the data (or broken flags) and the message the error must carry."""
    if how == "missing dir":
        return root / "nope", ["data directory", "nope does not exist"]
    if how == "missing split":
        shutil.rmtree(root / "val")
        return root, ["val does not exist"]
    if how == "empty class":
        for f in (root / "train" / "horizontal_fine").iterdir():
            f.unlink()
        return root, ["train/horizontal_fine holds no image files"]
    if how == "mismatched classes":
        (root / "val" / "vertical_fine").rename(root / "val" / "vertical")
        return root, ["different class folders", "only in val: vertical"]
    return root, []


@pytest.mark.parametrize(
    ("how", "flags", "message"),
    [
        ("missing dir", [], ""),
        ("missing split", [], ""),
        ("empty class", [], ""),
        ("mismatched classes", [], ""),
        ("", ["--num-classes", "5"], "--num-classes 5, but"),
        ("", ["--resize", "30"], "--resize 30 is smaller than --image-size 32"),
        ("", ["--evaluate"], "--evaluate needs a checkpoint"),
        ("", ["--finetune", "nothing.pth.tar"], "nothing.pth.tar: no such file"),
        ("", ["--resume", "nothing.pth.tar"], "nothing.pth.tar: no such file"),
    ],
)
def test_bad_input_is_one_line_before_any_training(data, tmp_path, capsys, how, flags, message):
    root, expected = _break(shutil.copytree(data, tmp_path / "data"), how)
    out = tmp_path / "run"
    assert main([str(root), *TINY, *flags, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1, err
    for part in [*expected, message]:
        assert part in err
    assert not out.exists()


def test_the_command_line_itself(data, tmp_path):
    """The script and the module run from the repository root; bad input exits 2 without a traceback."""
    run = subprocess.run(
        [sys.executable, "training/train.py", str(tmp_path / "missing"), "--arch", "resnet18_3g"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"train.py: error: data directory {tmp_path / 'missing'} does not exist"
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "training.train", str(data), *TINY, "--epochs", "1", "--output-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "epoch 1/1: train loss" in run.stdout and (out / "checkpoint.pth.tar").exists()
