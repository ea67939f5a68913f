"""Checkpoints: the authors' released ``.pth.tar`` files and this project's own.

Released files are ``torch.save`` dicts (``epoch``, ``arch``, ``state_dict``,
``best_prec1``, ``optimizer``; inference releases may hold only some) saved from a
``DataParallel`` model, so every key starts with ``module.``. This project's own
checkpoints add what a served model needs to describe itself: arch and head knobs,
class names, preprocessing, training arguments, epoch and metrics. Everything is
loaded with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from threegnet_preprocessing import IMAGENET, Preprocessing
from training.model import ThreeGNet, create_model, infer_config

FORMAT = "threegnet-checkpoint"
FORMAT_VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


@dataclass
class LoadedModel:
    """A model built from a checkpoint, with what the checkpoint says about it."""

    model: ThreeGNet
    arch: str
    num_classes: int
    path: Path
    released: bool  # the authors' format rather than this project's
    class_names: list[str] | None = None
    preprocessing: Preprocessing = IMAGENET
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole loaded dict


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` and errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors all mean "not a checkpoint"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def extract_state_dict(obj: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> dict[str, Tensor]:
    """The model's state dict, without ``module.``/``_orig_mod.`` prefixes.

    Accepts a checkpoint dict (``state_dict`` or ``model`` entry) or a bare state dict.
    """
    sd = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no model state dict found (keys: {sorted(obj)[:8]})")
    out = {}
    for key, value in sd.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _describe_mismatch(model: nn.Module, sd: dict[str, Tensor], limit: int = 10) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    parts = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_model(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Build the model a checkpoint describes and load its weights (``strict=True``).

    ``arch`` and ``num_classes`` override what the checkpoint says or implies; when
    the checkpoint does not say, they are inferred from the state dict's keys/shapes.
    The model is returned in eval mode on the CPU.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    sd = extract_state_dict(obj, path)
    own = obj.get("format") == FORMAT
    try:
        inferred = infer_config(sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    kwargs = dict(obj.get("model_kwargs") or {}) if own else {}
    kwargs.setdefault("num_stages", inferred["num_stages"])
    kwargs.setdefault("dim", inferred["dim"])
    arch = arch or (obj.get("arch") if own else None) or inferred["arch"]
    num_classes = num_classes or inferred["num_classes"]
    try:
        model = create_model(arch, num_classes=num_classes, **kwargs)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    problem = _describe_mismatch(model, sd)
    if problem:
        raise CheckpointError(f"{path}: state dict does not match {arch} ({num_classes} classes): {problem}")
    model.load_state_dict(sd, strict=True)
    model.eval()
    class_names = obj.get("class_names") if own else None
    if class_names is not None and len(class_names) != num_classes:
        raise CheckpointError(f"{path}: {len(class_names)} class names for {num_classes} classes")
    pp = Preprocessing.from_dict(obj["preprocessing"]) if own and obj.get("preprocessing") else IMAGENET
    return LoadedModel(
        model=model,
        arch=arch,
        num_classes=num_classes,
        path=path,
        released=not own,
        class_names=list(class_names) if class_names is not None else None,
        preprocessing=pp,
        model_kwargs=kwargs,
        raw=obj,
    )


def _plain(value: Any) -> Any:
    """Make training arguments storable under ``weights_only=True`` (no Paths, no objects)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def make_checkpoint(
    model: ThreeGNet,
    *,
    arch: str,
    class_names: list[str] | None = None,
    preprocessing: Preprocessing = IMAGENET,
    args: dict[str, Any] | None = None,
    epoch: int = 0,
    metrics: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """This project's checkpoint dict. ``extra`` holds resumable state (optimizer...)."""
    model = getattr(model, "module", model)  # unwrap DDP
    head = model.head
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": model.fc.out_features,
        "model_kwargs": {"num_stages": head.num_stages, "dim": head.dim, "iterations": head.iterations},
        "state_dict": model.state_dict(),
        "class_names": list(class_names) if class_names is not None else None,
        "preprocessing": preprocessing.to_dict(),
        "args": _plain(args or {}),
        "epoch": int(epoch),
        "metrics": _plain(metrics or {}),
        **extra,
    }


E = TypeVar("E", bound=BaseException)


def exception_in(e: BaseException, kind: type[E]) -> E | None:
    """The ``kind`` exception behind ``e``: itself, or one it was raised from or while handling
    (libraries wrap what they catch: ``torch.save`` reports a failed write as "enforce fail at
    inline_container.cc", with the ``OSError`` only as its context)."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def os_error_in(e: BaseException) -> OSError | None:
    return exception_in(e, OSError)


def describe_os_error(e: OSError) -> str:
    """What went wrong, in words: "no space left on device" for ENOSPC."""
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return e.strerror or str(e) or type(e).__name__


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A process killed mid-write leaves the previous file intact, never a torn one. A
    write that fails (a full disk, a read-only folder) removes the temporary file and
    raises :class:`CheckpointError` saying why ("no space left on device").
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = os_error_in(e) if isinstance(e, Exception) else None
        if cause is None:
            raise
        raise CheckpointError(f"cannot write {path}: {describe_os_error(cause)}") from e
    return path


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (released checkpoints are 200-300 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
