"""make demo's pipeline end to end, headless and tiny: generate, train, export, serve, predict, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import ROOT, released_checkpoint

from export.labels import imagenet_labels
from serve.server import free_port


@pytest.mark.slow
def test_demo_pipeline_headless(tmp_path):
    data, runs, repo = tmp_path / "data", tmp_path / "runs", tmp_path / "model_repository"
    ports = [str(free_port()) for _ in range(4)]
    cmd = [
        sys.executable, str(ROOT / "pipeline" / "run_all.py"), "--headless", "--tiny",
        "--data-dir", str(data), "--run-dir", str(runs), "--model-repository", str(repo),
        "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
        "--supervisor-metrics-port", ports[3],
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    val_images = sorted(p for p in (data / "val").rglob("*") if p.is_file())
    classes = sorted(p.name for p in (data / "val").iterdir())
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["path"] for line in lines) == sorted(str(p) for p in val_images)
    for line in lines:
        assert "error" not in line, line
        assert len(line["top_k"]) == 3 and {k["label"] for k in line["top_k"]} <= set(classes)
    assert (runs / "model_best.pth.tar").exists() and (repo / "threegnet" / "1" / "model.onnx").exists()
    assert "[demo] stopped" in result.stderr

    # A second run reuses the data, the checkpoint and the export.
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for reused in ("reusing the built-in data", "reusing " + str(runs / "model_best.pth.tar"), "reusing the export"):
        assert reused in again.stderr

    # The interactive demo: Triton and Gradio up, then one SIGINT to the process group (a terminal's
    # Ctrl-C) stops everything. Started with SIGINT ignored, as a shell script's background job is.
    demo_port = str(free_port())
    log = tmp_path / "demo.log"
    interactive = [c for c in cmd if c != "--headless"] + ["--demo-port", demo_port]
    with log.open("w") as out:
        proc = subprocess.Popen(
            interactive, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "[demo] ready in" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{demo_port}/", timeout=10) as page:
            assert page.status == 200
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Triton stopped." in log.read_text() and "[demo] stopped" in log.read_text()
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # nothing of the group outlives it
        os.killpg(proc.pid, 0)


@pytest.mark.slow
def test_demo_pipeline_serves_a_released_checkpoint(tmp_path):
    """make demo CHECKPOINT=...: no training; the released weights are exported and served with ImageNet labels."""
    checkpoint = tmp_path / "ResNet18-3G-ImageNet.pth.tar"
    released_checkpoint(checkpoint, "resnet18_3g", 1000)
    data, runs, repo = tmp_path / "data", tmp_path / "runs", tmp_path / "model_repository"
    ports = [str(free_port()) for _ in range(4)]
    cmd = [
        sys.executable, str(ROOT / "pipeline" / "run_all.py"), "--headless", "--tiny", "--checkpoint", str(checkpoint),
        "--data-dir", str(data), "--run-dir", str(runs), "--model-repository", str(repo),
        "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
        "--supervisor-metrics-port", ports[3],
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not runs.exists() and "training/train.py" not in result.stderr
    assert "resnet18_3g, 1000 classes (released checkpoint); labels from ImageNet-1K" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == sum(1 for p in (data / "val").rglob("*") if p.is_file())
    names = imagenet_labels()
    for line in lines:
        assert [names[k["index"]] for k in line["top_k"]] == [k["label"] for k in line["top_k"]], line
