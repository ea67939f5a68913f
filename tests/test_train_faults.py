"""Training as real processes (killed mid-epoch and resumed; two gloo ranks under torchrun) and on
data or folders it cannot use: one error line, exit 2, no checkpoint of an untrained model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import distributed
from training.checkpoint import load_model
from training.data import ImageFolderData, check_classes, collate_skipping
from training.engine import evaluate
from training.model import create_model
from training.synthetic import generate
from training.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--arch", "resnet18_3g", "--dim", "16", "--lr", "0.05", "--image-size", "32", "--resize", "32",
    "--workers", "0", "--no-progress", "--device", "cpu",
]  # fmt: skip


def epochs_logged(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_and_completes(tmp_path):
    # 90 steps of 2 images per epoch: seconds per epoch, so the kill lands well inside one.
    data = generate(tmp_path / "data", classes=3, per_class=60, val_per_class=2, size=32, progress=False)
    out = tmp_path / "run"
    command = [sys.executable, "training/train.py", str(data), *TINY, "--batch-size", "2", "--epochs", "3"]
    command += ["--output-dir", str(out)]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "epoch 2/3 started" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "epoch 2 never started"
            time.sleep(0.02)
        time.sleep(0.1)  # a few steps into epoch 2
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "epoch 2/3:" not in log.read_text()  # killed before epoch 2 finished
    assert torch.load(out / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1
    assert epochs_logged(out) == [1]

    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "after epoch 1" in resumed.stdout
    assert "epoch 1/3 started" not in resumed.stdout
    loaded = load_model(out / "checkpoint.pth.tar")
    assert loaded.raw["epoch"] == 3 and loaded.num_classes == 3
    assert epochs_logged(out) == [1, 2, 3]
    assert load_model(out / "model_best.pth.tar").class_names == loaded.class_names
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun(tmp_path):
    data = generate(tmp_path / "data", classes=3, per_class=6, val_per_class=3, size=32, progress=False)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    command += ["training/train.py", str(data), *TINY, "--batch-size", "4", "--epochs", "2"]
    command += ["--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es) on cpu" in run.stdout
    assert run.stdout.count("epoch 1/2 started") == 1  # rank 0 alone logs
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]  # rank 0 alone writes
    # Summed over both ranks: every training image once per epoch, every val image exactly once.
    assert [(m["train_images"], m["val_images"]) for m in lines] == [(18, 9), (18, 9)]
    loaded = load_model(out / "checkpoint.pth.tar")
    assert loaded.raw["epoch"] == 2 and loaded.raw["args"]["batch_size"] == 4
    assert not any(k.startswith("module.") for k in loaded.raw["state_dict"])


def unreadable(split_dir: Path) -> int:
    """Overwrite every image of a split with bytes no decoder takes; returns how many."""
    files = [p for p in split_dir.rglob("*.png")]
    for path in files:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not a picture any more")
    return len(files)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_with_no_readable_image_stops_before_any_checkpoint(tmp_path, capsys, split):
    data = generate(tmp_path / "data", classes=2, per_class=4, val_per_class=2, size=32, progress=False)
    broken = unreadable(data / split)
    out = tmp_path / "run"
    assert train_main([str(data), *TINY, "--batch-size", "4", "--epochs", "2", "--output-dir", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"train.py: error: no readable image in {split}: all {broken} image file(s) read were unreadable "
        f"(e.g. {captured.err.split('(e.g. ', 1)[1]}"
    )
    assert "corrupt or truncated image" in captured.err or "not an image" in captured.err, captured.err
    assert "done: best val top-1" not in captured.out
    assert sorted(p.name for p in out.iterdir()) == []  # no checkpoint, no model_best, no metrics line


def test_a_pass_that_reads_no_image_counts_none(tmp_path):
    """The counts recorded in metrics.jsonl come from here: 0 read means 0, not 1."""
    data = generate(tmp_path / "data", classes=2, per_class=1, val_per_class=2, size=32, progress=False)
    unreadable(data / "val")
    val = ImageFolderData(data / "val", check_classes(data, ("val",)), lambda img: img)
    batches = [collate_skipping([val[i] for i in range(len(val))])]
    ctx = distributed.setup("cpu")
    stats = evaluate(create_model("resnet18_3g", num_classes=2, dim=16), batches, ctx, progress=False)
    assert (stats.images, stats.skipped, stats.loss, stats.top1) == (0, 4, 0.0, 0.0)


def test_an_output_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    data = generate(tmp_path / "data", classes=2, per_class=2, val_per_class=1, size=32, progress=False)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("keep me")
    assert train_main([str(data), *TINY, "--batch-size", "2", "--epochs", "1", "--output-dir", str(blocker)]) == 2
    assert capsys.readouterr().err == f"train.py: error: --output-dir {blocker} exists and is not a directory\n"
    assert blocker.read_text() == "keep me"
