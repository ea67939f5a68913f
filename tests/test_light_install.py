"""The client-only install: `pip install ".[client]"` in a fresh virtual environment brings no torch,
torchvision, onnx or onnxruntime, and both clients work against a real server with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY_CLASSES, TINY_PREPROCESSING, png

from serve.children import NotAnswering, wait_http_ok
from serve.server import free_port

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "pytriton")


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run([*pip, "-c", str(ROOT / "requirements.lock"), f"{ROOT}[client]"],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_the_client_install_has_no_heavy_dependencies(light_venv):
    python = str(light_venv / "bin" / "python")
    probe = "import importlib.util, json; print(json.dumps({m: bool(importlib.util.find_spec(m)) for m in %r}))"
    found = json.loads(subprocess.run([python, "-c", probe % (HEAVY,)], capture_output=True, text=True,
                                      check=True).stdout)  # fmt: skip
    assert not any(found.values()), found
    # What the clients need is there, importable without the training code.
    subprocess.run([python, "-c", "import client.predict, client.demo, threegnet_preprocessing"], check=True,
                   cwd=light_venv, timeout=120)  # fmt: skip


@pytest.mark.slow
def test_both_clients_work_against_a_server_from_the_light_install(light_venv, triton, tmp_path):
    python = str(light_venv / "bin" / "python")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(png(80, 60, seed=i))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for send in ("bytes", "tensor"):  # tensor: preprocessing here, with threegnet_preprocessing
        result = subprocess.run(
            [python, str(ROOT / "client" / "predict.py"), str(images), "--url", triton.grpc_url, "--json",
             "--send", send, "--resize", str(TINY_PREPROCESSING["resize"])],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(lines) == 3 and all(k["label"] in TINY_CLASSES for line in lines for k in line["top_k"])

    port = free_port()
    log = tmp_path / "demo.log"
    cmd = [python, str(ROOT / "client" / "demo.py"), "--url", triton.grpc_url, "--port", str(port)]
    with log.open("w") as out:
        demo = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/", demo, 120)
        except NotAnswering as e:
            pytest.fail(f"the demo page: {e}\n{log.read_text()[-2000:]}")
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=30)
