"""Shared fixtures and hooks. Everything a test needs it makes itself: no downloads. Plain helpers
(constants, functions, classes) are in helpers.py: tests import them from there, not from here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import TINY_CLASSES, TINY_PREPROCESSING

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots etc., kept after the run


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


def cuda_available() -> bool:
    """A CUDA GPU that both PyTorch and onnxruntime can use."""
    import onnxruntime
    import torch

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run where a GPU is (see tests/test_gpu.py); elsewhere they are
    reported as skipped, with the reason, never silently passed."""
    if not any(item.get_closest_marker("gpu") for item in items) or cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with onnxruntime's CUDA provider")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


# -- a tiny exported model and a real Triton server, shared by the serving and client tests --------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained 3G-Net in this project's checkpoint format (64x64 crops)."""
    import torch

    from threegnet_preprocessing import Preprocessing
    from training.checkpoint import make_checkpoint, save_atomic
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("resnet18_3g", num_classes=len(TINY_CLASSES), dim=32)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pth.tar"
    ckpt = make_checkpoint(
        model, arch="resnet18_3g", class_names=TINY_CLASSES, preprocessing=Preprocessing(**TINY_PREPROCESSING)
    )
    return save_atomic(ckpt, path)


@pytest.fixture(scope="session")
def model_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_checkpoint`` exported by ``export/to_onnx.py`` into a fresh model repository."""
    from export.to_onnx import main as export_main

    repo = tmp_path_factory.mktemp("model_repository")
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo)]) == 0
    return repo


@pytest.fixture
def own_repository(model_repository: Path, tmp_path: Path) -> Path:
    """A copy of the exported repository that a test may change."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    return repo


@pytest.fixture(scope="session")
def triton(model_repository: Path):
    """A real Triton server (``serve/server.py``) on free ports, serving ``model_repository``."""
    from serve.server import TritonServer

    # Clients in the tests keep connections open; don't wait 30 s for them at the end.
    server = TritonServer.on_free_ports(model_repository, exit_timeout=3)
    with server:
        yield server
