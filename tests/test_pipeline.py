"""make demo's pipeline end to end, headless and tiny: generate, train, export, serve, predict, stop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from serve.server import free_port


@pytest.mark.slow
def test_demo_pipeline_headless(tmp_path):
    data, runs, repo = tmp_path / "data", tmp_path / "runs", tmp_path / "model_repository"
    ports = [str(free_port()) for _ in range(3)]
    cmd = [
        sys.executable, str(ROOT / "pipeline" / "demo.py"), "--headless", "--tiny",
        "--data-dir", str(data), "--run-dir", str(runs), "--model-repository", str(repo),
        "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
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
