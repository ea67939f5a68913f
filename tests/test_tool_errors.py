"""The command-line tools on a full disk, a full TMPDIR, a read-only folder and stop signals:
one ``error:`` line, the documented exit status, and no staging copies left behind.

A full disk is a real one: a 2 MiB tmpfs mounted for the test (the exported and saved
models are tens of MB). Mounting needs root (or CAP_SYS_ADMIN); where it is refused the
tests fail with the reason rather than skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT

from export.to_onnx import main as export_main
from training.synthetic import generate
from training.train import main as train_main

TINY_TRAIN = [
    "--arch", "resnet18_3g", "--dim", "16", "--batch-size", "4", "--lr", "0.05", "--epochs", "1",
    "--image-size", "32", "--resize", "36", "--workers", "0", "--no-progress", "--device", "cpu",
]  # fmt: skip


def mount_tmpfs(where: Path, size: str = "2m", read_only: bool = False) -> None:
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs on {where} to simulate a full or read-only disk (needs root or CAP_SYS_ADMIN): "
            f"{(result.stderr or result.stdout).strip()}"
        )


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An empty 2 MiB file system."""
    where = tmp_path / "small_disk"
    mount_tmpfs(where)
    try:
        yield where
    finally:
        unmount(where)


@pytest.fixture
def own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR for this test alone (in this process: tempfile's cached choice)."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def staging_in(tmpdir: Path) -> list[str]:
    """What an export left in TMPDIR, less what its libraries keep there on success too (onnxruntime's
    ``.ses`` session id, torch's empty ``torchinductor_<user>`` cache folder)."""
    return [
        f"{p} ({p.stat().st_size} bytes)"
        for p in tmpdir.rglob("*")
        if p.name != ".ses" and not (p.is_dir() and p.name.startswith("torchinductor_") and not any(p.iterdir()))
    ]


def leftovers(directory: Path) -> list[str]:
    """Staging names (.incoming-*, .old-*, .*.tmp) anywhere under ``directory``."""
    return [str(p) for p in directory.rglob(".*")]


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


def test_export_onto_a_full_disk_says_so_and_leaves_no_partial_copy(tiny_checkpoint, small_disk, own_tmpdir, capsys):
    repo = small_disk / "repo"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: no space left on device") and str(small_disk) in line
    assert leftovers(small_disk) == []  # no partial .incoming-1/model.onnx keeping the disk full
    assert os.listdir(repo) == []  # the model folder it had made is gone too: no half-made model to serve
    assert shutil.disk_usage(small_disk).used < 256 * 1024
    assert staging_in(own_tmpdir) == []


def test_export_with_a_full_tmpdir_says_so_and_leaves_nothing_there(
    tiny_checkpoint, small_disk, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    repo = tmp_path / "repo"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo)]) == 2
    assert "no space left on device" in error_line(capsys.readouterr().err)
    assert staging_in(small_disk) == []
    assert not (repo / "threegnet" / "1").exists() and leftovers(repo) == []


def test_export_into_a_read_only_model_folder_fails_before_exporting(tiny_checkpoint, tmp_path, own_tmpdir, capsys):
    repo = tmp_path / "repo"
    model_dir = repo / "threegnet"
    mount_tmpfs(model_dir, read_only=True)
    try:
        started = time.perf_counter()
        assert export_main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo)]) == 2
        err = capsys.readouterr().err
        line = error_line(err)
        assert line == f"error: cannot write to {model_dir}: Read-only file system"
        assert "[2/4]" not in err and time.perf_counter() - started < 10  # refused before tracing
        assert os.listdir(model_dir) == [] and staging_in(own_tmpdir) == []
    finally:
        unmount(model_dir)


@pytest.mark.parametrize(("sig", "during"), [(signal.SIGINT, "[2/4]"), (signal.SIGTERM, "[3/4]")])
def test_a_stopped_export_removes_its_staging(tiny_checkpoint, tmp_path, sig, during):
    tmp, repo, log = tmp_path / "tmpdir", tmp_path / "repo", tmp_path / "export.log"
    tmp.mkdir()
    command = [sys.executable, "export/to_onnx.py", "--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo)]
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=ROOT, stderr=f, env={**os.environ, "TMPDIR": str(tmp)})
    try:
        deadline = time.monotonic() + 120
        while during not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        assert any(n.startswith("threegnet-export-") for n in os.listdir(tmp)), "no work folder in TMPDIR yet"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    err = log.read_text()
    assert "Traceback" not in err
    assert f"stopped by {signal.Signals(sig).name}: export abandoned; staging removed" in err
    assert staging_in(tmp) == []
    assert leftovers(repo) == [] and not (repo / "threegnet" / "1").exists()


def test_training_onto_a_full_disk_is_one_error_line(small_disk, tmp_path, capsys):
    data = generate(tmp_path / "data", classes=2, per_class=4, val_per_class=2, size=32, progress=False)
    out = small_disk / "run"
    assert train_main([str(data), *TINY_TRAIN, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "inline_container" not in err
    assert err == f"train.py: error: cannot write {out / 'checkpoint.pth.tar'}: no space left on device\n"
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]  # no temporary file filling the disk


@pytest.mark.parametrize(
    ("tool", "codes"),
    [
        ("training/train.py", ["0 ", "1 ", "2 ", "130 "]),
        ("export/to_onnx.py", ["0 ", "2 ", "130 "]),
        ("client/predict.py", ["0 ", "1 ", "2 ", "130 "]),
    ],
)
def test_every_tool_lists_its_exit_codes_in_its_help(tool, codes):
    result = subprocess.run([sys.executable, tool, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    epilog = result.stdout.split("xit status:", 1)[1]
    for code in codes:
        assert f"\n  {code}" in epilog, (code, epilog)
