"""Serving ONNX models on a Triton server that has no onnxruntime backend.

The Triton server in the ``nvidia-pytriton`` wheel has only the python backend.
Rather than exporting a second kind of repository, the launcher builds a shadow of
the exported one in a temporary folder: every onnxruntime model becomes a python
model running ``triton_models/onnx_standin.py`` on the very same ``model.onnx``
(linked, not copied) with the same inputs, outputs, labels, batching and warmup;
every other model (the preprocessing model, the ensemble) is linked unchanged.

The launcher serves such a shadow under its supervisor also where Triton has the
onnxruntime backend (the configs then stay as they are): the shadow of an ONNX model
holds only the versions the supervisor verified, with a ``specific`` policy naming
them, because Triton reads configs from disk on loads the supervisor does not make
with a config (loading an ensemble reloads the models under it as their files say),
and a version Triton fails to load leaves the server not ready (serve/rollouts.py).

On a machine without a GPU every model in the shadow batches at most ``CPU_MAX_BATCH_SIZE``
(:func:`for_device`): the export's batch is sized for a GPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export.triton_config import CPU_MAX_BATCH_SIZE, parse_pbtxt, to_pbtxt

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


def for_device(cfg: mc.ModelConfig, gpu: bool) -> mc.ModelConfig:
    """The config as this machine serves it: on a CPU no model batches (or warms up) more than
    ``CPU_MAX_BATCH_SIZE``; an ensemble's batch is at most its models'. The same message when unchanged."""
    if gpu or cfg.max_batch_size <= CPU_MAX_BATCH_SIZE:
        return cfg
    capped = mc.ModelConfig()
    capped.CopyFrom(cfg)
    capped.max_batch_size = CPU_MAX_BATCH_SIZE
    for warmup in capped.model_warmup:
        warmup.batch_size = min(warmup.batch_size, CPU_MAX_BATCH_SIZE)
    return capped


def served_config(cfg: mc.ModelConfig, gpu: bool, standin: bool, versions: list[int] | None) -> mc.ModelConfig:
    """What Triton is given for an ONNX model: the stand-in's twin (``standin``) or the config as it
    is, for this machine (:func:`for_device`), serving exactly ``versions`` (None: as its own policy says)."""
    served = mc.ModelConfig()
    served.CopyFrom(for_device(standin_config(cfg, gpu) if standin else cfg, gpu))
    if versions is not None:
        served.version_policy.CopyFrom(
            mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=sorted(versions)))
        )
    return served


def _link_tree(source: Path, target: Path, skip: str | None = None) -> None:
    """Mirror ``source`` as real folders of links to its files (but ``skip``).

    Python models write ``__pycache__`` beside their ``model.py``: with real folders
    that happens in the shadow, never in the exported repository.
    """
    target.mkdir()
    for entry in source.iterdir():
        if entry.is_dir():
            if entry.name != "__pycache__":
                _link_tree(entry, target / entry.name)
        elif entry.name != skip:
            os.symlink(entry.resolve(), target / entry.name)


def shadow_model(
    model_dir: Path, target: Path, gpu: bool = False, versions: list[int] | None = None, standin: bool = True
) -> bool:
    """Write the shadow of one model folder at ``target``; True when it runs through the stand-in.
    An ONNX model's shadow holds only ``versions`` (None: all); ``standin`` False keeps its config."""
    config_file = model_dir / "config.pbtxt"
    cfg = parse_pbtxt(config_file.read_text()) if config_file.exists() else None
    if cfg is None or not is_onnx_model(cfg):
        served = cfg if cfg is None else for_device(cfg, gpu)
        _link_tree(model_dir, target, skip=None if served is cfg else config_file.name)
        if served is not cfg:
            (target / config_file.name).write_text(to_pbtxt(served))
        return False
    target.mkdir()
    (target / "config.pbtxt").write_text(to_pbtxt(served_config(cfg, gpu, standin, versions)))
    for entry in model_dir.iterdir():
        if entry.name == "config.pbtxt" or entry.name.startswith("."):
            continue  # hidden entries: an export's staging folders
        if entry.is_dir() and entry.name.isdigit():
            if versions is not None and int(entry.name) not in versions:
                continue  # not verified (yet): out of Triton's sight
            _link_tree(entry, target / entry.name)
            if standin:
                shutil.copy2(STANDIN, target / entry.name / "model.py")
        elif entry.is_file():
            os.symlink(entry.resolve(), target / entry.name)
    return standin


def refresh_shadow_model(
    model_dir: Path, shadow_root: Path, gpu: bool = False, versions: list[int] | None = None, standin: bool = True
) -> bool:
    """Replace (or add) one model's shadow as a whole, for a server that is running:
    built aside, then swapped in, so Triton never reads a half-built folder. Processes
    already running from the old folder keep their open files."""
    live = shadow_root / model_dir.name
    staging, old = shadow_root / f".staging-{model_dir.name}", shadow_root / f".old-{model_dir.name}"
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    through_standin = shadow_model(model_dir, staging, gpu, versions, standin)
    if live.exists():
        os.replace(live, old)
    os.replace(staging, live)
    shutil.rmtree(old, ignore_errors=True)
    return through_standin


def model_dirs(repository: Path) -> list[Path]:
    """The model folders of a repository (hidden folders are an export's work in progress)."""
    return sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def build_shadow_repository(
    source: Path, target: Path, gpu: bool = False, verified: bool = False, standin: bool = True
) -> list[str]:
    """Fill ``target`` with the shadow of ``source``; returns the names of the models
    that run through the stand-in. ``verified``: no ONNX version yet (the supervisor adds
    the ones it verified)."""
    target.mkdir(parents=True, exist_ok=True)
    versions = [] if verified else None
    return [d.name for d in model_dirs(source) if shadow_model(d, target / d.name, gpu, versions, standin)]
