"""Writing a Triton model repository: versions, atomic moves, nothing half-written.

Layout written for a model NAME:

    DIR/NAME/config.pbtxt            onnxruntime backend, raw uint8 tensors
    DIR/NAME/labels.txt
    DIR/NAME/<version>/model.onnx
    DIR/NAME_preprocess/...          python backend: image bytes -> tensor
    DIR/NAME_image/...               ensemble: image bytes -> NAME_preprocess -> NAME
    DIR/NAME_classifier/...          ensemble: tensors -> NAME, probabilities only (Triton's image_client.py)
    DIR/NAME_image_classifier/...    ensemble: bytes -> probabilities only (ensemble_image_client.py)

Files are staged elsewhere and moved in with ``os.replace``; a version directory
appears complete or not at all. Each version also carries its completion record,
``<version>/complete.json`` (every file's size and sha256): a copy of a version made
by hand or by a sync tool is not atomic, and a server loads only versions whose files
match their record (``serve/versions.py --seal`` writes one for a copied version).
Whatever fails (a full disk, a read-only folder, a stop signal turned into an
exception), the staging copies (``.incoming-*``, ``.*.tmp``) are removed and a
replaced version is put back.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from export.triton_config import (
    LABELS_FILE,
    ModelSpec,
    classifier_configs,
    ensemble_config,
    preprocess_model_config,
    to_pbtxt,
)
from export.triton_config import onnx_model_config as onnx_config

ROOT = Path(__file__).resolve().parents[1]
PREPROCESS_MODEL = ROOT / "serve" / "triton_models" / "image_preprocess.py"
PREPROCESSING_MODULE = ROOT / "threegnet_preprocessing.py"  # the one source of truth, copied as it is


class RepositoryError(RuntimeError):
    """The repository cannot be written as asked."""


COMPLETION_RECORD = "complete.json"


def _version_files(version_dir: Path) -> list[str]:
    """The files a version is made of (relative paths), its record aside: hidden files are work
    in progress (a sync tool's temporaries), ``__pycache__`` is the server's."""
    found = []
    for root, dirs, files in os.walk(version_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        found += [str((Path(root) / f).relative_to(version_dir)) for f in files if not f.startswith(".")]
    return sorted(f for f in found if f != COMPLETION_RECORD)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def completion_record(version_dir: Path) -> str:
    """The completion record of ``version_dir`` as it is now (no timestamp: the same files give the same record)."""
    files = {
        name: {"size": (version_dir / name).stat().st_size, "sha256": _sha256(version_dir / name)}
        for name in _version_files(version_dir)
    }
    return json.dumps({"files": files}, indent=1, sort_keys=True) + "\n"


def write_completion_record(version_dir: Path) -> None:
    """Seal ``version_dir``: written last and atomically, so its presence means every file was there."""
    write_text_atomic(version_dir / COMPLETION_RECORD, completion_record(version_dir))


def incomplete(version_dir: Path) -> str | None:
    """Why ``version_dir`` is not a complete version (no record, a file missing, short, changed or
    unexpected), or None when every file matches its completion record."""
    record_file = version_dir / COMPLETION_RECORD
    try:
        files = json.loads(record_file.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no completion record ({COMPLETION_RECORD}): still being copied, or copied without one"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable completion record {COMPLETION_RECORD}: {e}"
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return f"unreadable completion record {COMPLETION_RECORD}: no file table"
    present = _version_files(version_dir)
    if extra := sorted(set(present) - set(files)):
        return f"{', '.join(extra)} not in its completion record"
    for name, expected in sorted(files.items()):
        path = version_dir / name
        if name not in present:
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{name} has {size} bytes, its completion record says {expected.get('size')} (a partial copy?)"
        if _sha256(path) != expected.get("sha256"):
            return f"{name} does not match the sha256 in its completion record"
    return None


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def choose_version(model_dir: Path, version: int | None, force: bool) -> int:
    """The version to write: the next free one, or ``version``; never an existing
    one unless ``force``."""
    existing = versions(model_dir)
    if version is None:
        if force and existing:
            return existing[-1]
        return (existing[-1] + 1) if existing else 1
    if version < 1:
        raise RepositoryError(f"version must be >= 1, got {version}")
    if version in existing and not force:
        raise RepositoryError(f"{model_dir / str(version)} exists; pass --force to replace it")
    return version


def check_writable(directory: Path) -> None:
    """Fail early, before a long export, when ``directory`` cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RepositoryError(f"cannot write to {directory}: {e.strerror or e}") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write atomically; leave an identical file alone (a serving launcher reloads what changes)."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _same_files(a: Path, b: Path) -> bool:
    """Two flat folders with the same file names and contents."""
    if not b.is_dir():
        return False
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir() if p.name != "__pycache__"):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def _install_dir(staged: Path, target: Path) -> None:
    """Move a complete directory into place, replacing ``target`` if it exists (and differs)."""
    if _same_files(staged, target):
        return
    incoming = target.with_name(f".incoming-{target.name}")
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        incoming.mkdir()
        for f in sorted(staged.iterdir()):  # flat; file by file, so that an OSError keeps its errno
            shutil.copy2(f, incoming / f.name)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            try:
                os.replace(incoming, target)
            except BaseException:
                os.replace(old, target)  # the previous version stays
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(incoming, target)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)  # gone already after a success; a partial copy otherwise
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)


def write_repository(
    output_dir: Path,
    spec: ModelSpec,
    onnx_file: Path,
    labels: list[str],
    preprocessing: dict,
    version: int,
) -> dict[str, Path]:
    """Install an exported model, its labels, the preprocessing model and the ensemble.

    On any failure the folders this call created (a new version, new models) are removed again:
    a server must not find a half-made model. A version replaced with ``--force`` stays replaced.
    """
    model_dir = output_dir / spec.name
    labels_text = "".join(f"{label}\n" for label in labels)
    created: list[Path] = []
    if not (model_dir / str(version)).exists():
        created.append(model_dir / str(version))  # a new version: gone again if the rest fails

    def make(directory: Path) -> None:
        if not directory.exists():
            directory.mkdir(parents=True)
            created.append(directory)

    try:
        make(model_dir)
        with tempfile.TemporaryDirectory(prefix="threegnet-repo-") as tmp:
            staged = Path(tmp)
            (staged / "version").mkdir()
            shutil.copy2(onnx_file, staged / "version" / "model.onnx")
            write_completion_record(staged / "version")
            _install_dir(staged / "version", model_dir / str(version))
            write_text_atomic(model_dir / LABELS_FILE, labels_text)
            write_text_atomic(model_dir / "config.pbtxt", to_pbtxt(onnx_config(spec)))

            pre_dir = output_dir / spec.preprocess_name
            make(pre_dir)
            (staged / "pre").mkdir()
            shutil.copy2(PREPROCESS_MODEL, staged / "pre" / "model.py")
            shutil.copy2(PREPROCESSING_MODULE, staged / "pre" / "threegnet_preprocessing.py")
            _install_dir(staged / "pre", pre_dir / "1")
            write_text_atomic(pre_dir / "config.pbtxt", to_pbtxt(preprocess_model_config(spec, preprocessing)))

            written = {"model": model_dir, "preprocess": pre_dir}
            ensembles = (("ensemble", ensemble_config(spec)), *(("classifier", c) for c in classifier_configs(spec)))
            for key, cfg in ensembles:
                ens_dir = output_dir / cfg.name
                make(ens_dir)
                (ens_dir / "1").mkdir(exist_ok=True)  # Triton wants a version dir, even empty
                write_text_atomic(ens_dir / LABELS_FILE, labels_text)
                write_text_atomic(ens_dir / "config.pbtxt", to_pbtxt(cfg))
                written.setdefault(key, ens_dir)
    except BaseException:
        for directory in created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return written
