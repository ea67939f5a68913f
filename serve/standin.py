"""Serving ONNX models on a Triton server that has no onnxruntime backend.

The Triton server in the ``nvidia-pytriton`` wheel has only the python backend.
Rather than exporting a second kind of repository, the launcher builds a shadow of
the exported one in a temporary folder: every onnxruntime model becomes a python
model running ``triton_models/onnx_standin.py`` on the very same ``model.onnx``
(linked, not copied) with the same inputs, outputs, labels, batching and warmup;
every other model (the preprocessing model, the ensemble) is linked unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export.triton_config import parse_pbtxt, to_pbtxt

STANDIN = Path(__file__).resolve().parent / "triton_models" / "onnx_standin.py"


def is_onnx_model(cfg: mc.ModelConfig) -> bool:
    return cfg.backend == "onnxruntime" or cfg.platform == "onnxruntime_onnx"


def standin_config(cfg: mc.ModelConfig, gpu: bool) -> mc.ModelConfig:
    """The python-backend twin of an onnxruntime config."""
    twin = mc.ModelConfig()
    twin.CopyFrom(cfg)
    twin.backend, twin.platform = "python", ""
    twin.ClearField("default_model_filename")
    twin.optimization.ClearField("execution_accelerators")  # TensorRT & co. are onnxruntime-backend options
    # Triton sees CPU instances (its tensors stay in host memory); on a GPU machine
    # onnxruntime itself runs the model with its CUDA provider.
    if not twin.instance_group:
        twin.instance_group.add(count=1)
    for group in twin.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        group.ClearField("gpus")
    twin.parameters["onnxruntime_device"].string_value = "cuda" if gpu else "cpu"
    return twin


def _link_tree(source: Path, target: Path) -> None:
    """Mirror ``source`` as real folders of links to its files.

    Python models write ``__pycache__`` beside their ``model.py``: with real folders
    that happens in the shadow, never in the exported repository.
    """
    target.mkdir()
    for entry in source.iterdir():
        if entry.is_dir():
            if entry.name != "__pycache__":
                _link_tree(entry, target / entry.name)
        else:
            os.symlink(entry.resolve(), target / entry.name)


def shadow_model(model_dir: Path, target: Path, gpu: bool = False) -> bool:
    """Write the shadow of one model folder at ``target``; True when it runs through the stand-in."""
    config_file = model_dir / "config.pbtxt"
    cfg = parse_pbtxt(config_file.read_text()) if config_file.exists() else None
    if cfg is None or not is_onnx_model(cfg):
        _link_tree(model_dir, target)
        return False
    target.mkdir()
    (target / "config.pbtxt").write_text(to_pbtxt(standin_config(cfg, gpu)))
    for entry in model_dir.iterdir():
        if entry.name == "config.pbtxt" or entry.name.startswith("."):
            continue  # hidden entries: an export's staging folders
        if entry.is_dir() and entry.name.isdigit():
            _link_tree(entry, target / entry.name)
            shutil.copy2(STANDIN, target / entry.name / "model.py")
        elif entry.is_file():
            os.symlink(entry.resolve(), target / entry.name)
    return True


def refresh_shadow_model(model_dir: Path, shadow_root: Path, gpu: bool = False) -> bool:
    """Replace (or add) one model's shadow as a whole, for a server that is running:
    built aside, then swapped in, so Triton never reads a half-built folder. Processes
    already running from the old folder keep their open files."""
    live = shadow_root / model_dir.name
    staging, old = shadow_root / f".staging-{model_dir.name}", shadow_root / f".old-{model_dir.name}"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    standin = shadow_model(model_dir, staging, gpu)
    if live.exists():
        os.replace(live, old)
    os.replace(staging, live)
    shutil.rmtree(old, ignore_errors=True)
    return standin


def model_dirs(repository: Path) -> list[Path]:
    """The model folders of a repository (hidden folders are an export's work in progress)."""
    return sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def build_shadow_repository(source: Path, target: Path, gpu: bool = False) -> list[str]:
    """Fill ``target`` with the shadow of ``source``; returns the names of the models
    that run through the stand-in."""
    target.mkdir(parents=True, exist_ok=True)
    return [d.name for d in model_dirs(source) if shadow_model(d, target / d.name, gpu)]
