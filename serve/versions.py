"""Which versions of a model a Triton repository serves: list them, roll back, roll forward.

    python serve/versions.py --model-repository model_repository                  # list
    python serve/versions.py --model-repository model_repository --serve 1        # roll back to version 1
    python serve/versions.py --model-repository model_repository --serve latest   # the newest again
    python serve/versions.py --model-repository model_repository --seal 2         # a version copied by hand
    python serve/versions.py --model-repository model_repository --check 2        # would it be loaded?

``--serve`` rewrites the model's ``version_policy`` in its ``config.pbtxt`` (atomically);
a running ``serve/launch.py`` sees the change within its poll interval and loads it
without a restart: the old version answers until the new choice is ready.

A running launcher loads only *verified* versions (:func:`verify_version`): complete (every
file matches the completion record the export writes last, so a half-copied version is
never tried), with the model's label files present, and loading in onnxruntime with the
inputs and outputs the served config declares and finite answers to a smoke inference. A
version copied by hand or by a sync tool has no record, or the record of its source:
``--seal`` checks the copy the same way and writes the record. The launcher runs
``--check`` in a child process, so that a model file that crashes onnxruntime cannot take
the launcher down.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.repository import incomplete, versions, write_completion_record, write_text_atomic
from export.triton_config import describe_version_policy, parse_pbtxt, to_pbtxt, version_policy

CHECK_REJECTED = 3  # --check's exit status for a version that must not be loaded (its reason on stdout)
# Triton's data types as onnxruntime names them
_ORT_TYPES = {
    "BOOL": "tensor(bool)", "UINT8": "tensor(uint8)", "UINT16": "tensor(uint16)", "UINT32": "tensor(uint32)",
    "UINT64": "tensor(uint64)", "INT8": "tensor(int8)", "INT16": "tensor(int16)", "INT32": "tensor(int32)",
    "INT64": "tensor(int64)", "FP16": "tensor(float16)", "FP32": "tensor(float)", "FP64": "tensor(double)",
    "STRING": "tensor(string)",
}  # fmt: skip


class VersionsError(RuntimeError):
    """The repository or the version asked for does not exist."""


def current(model_dir: Path) -> tuple[list[int], list[int], str]:
    """(versions on disk, versions the policy serves, the policy)."""
    config = model_dir / "config.pbtxt"
    if not config.exists():
        raise VersionsError(f"{model_dir}: no config.pbtxt (not a model of this repository?)")
    policy = parse_pbtxt(config.read_text()).version_policy
    on_disk = versions(model_dir)
    which = policy.WhichOneof("policy_choice")
    if which == "specific":
        served = [v for v in policy.specific.versions if v in on_disk]
    elif which == "all":
        served = on_disk
    else:
        served = on_disk[-(policy.latest.num_versions if which == "latest" else 1) :]
    return on_disk, served, describe_version_policy(policy)


def serve(model_dir: Path, choice: str) -> str:
    """Point ``model_dir``'s policy at ``choice`` ("latest" or a version number); returns the new policy."""
    on_disk = versions(model_dir)
    if choice == "latest":
        policy = "latest:1"
    elif choice.isdigit() and int(choice) in on_disk:
        policy = f"specific:{int(choice)}"
    else:
        listing = ", ".join(map(str, on_disk)) or "none"
        raise VersionsError(f"{model_dir.name} has no version {choice!r} (versions on disk: {listing})")
    config = model_dir / "config.pbtxt"
    cfg = parse_pbtxt(config.read_text())
    cfg.version_policy.CopyFrom(version_policy(policy))
    write_text_atomic(config, to_pbtxt(cfg))
    return policy


def read_config(model_dir: Path) -> mc.ModelConfig:
    config = model_dir / "config.pbtxt"
    try:
        return parse_pbtxt(config.read_text())
    except FileNotFoundError:
        raise VersionsError(f"{model_dir}: no config.pbtxt (not a model of this repository?)") from None
    except (OSError, text_format.ParseError) as e:
        raise VersionsError(f"{config}: unreadable: {e}") from None


def missing_model_files(model_dir: Path, cfg: mc.ModelConfig) -> str | None:
    """The files the config names beside the versions (label files): Triton fails the load of
    every version without them, the one serving included."""
    for output in cfg.output:
        if output.label_filename and not (model_dir / output.label_filename).is_file():
            return f"{output.label_filename} (the labels of output {output.name!r}) is missing from {model_dir.name}/"
    return None


def _expected_shape(cfg: mc.ModelConfig, dims: list[int]) -> list[int]:
    return ([-1] if cfg.max_batch_size > 0 else []) + list(dims)


def _shape_matches(expected: list[int], actual: list) -> bool:
    """A config shape (-1: any) against onnxruntime's (a name or None: any)."""
    return len(expected) == len(actual) and all(
        e == -1 or not isinstance(a, int) or a in (-1, e) for e, a in zip(expected, actual, strict=True)
    )


def onnx_problem(model_dir: Path, version: int, cfg: mc.ModelConfig) -> str | None:
    """Why onnxruntime cannot serve ``version`` under ``cfg``, or None: the model loads, declares the
    config's inputs and outputs (names, types, shapes), and answers a batch of one with finite
    outputs of the declared shapes."""
    import onnxruntime as ort

    name = cfg.default_model_filename or "model.onnx"
    path = model_dir / str(version) / name
    if not path.is_file():
        return f"no {name} in version {version}"
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        return f"{name} does not load in onnxruntime: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    declared = {i.name: i for i in session.get_inputs()} | {o.name: o for o in session.get_outputs()}
    feeds = {}
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        for t in tensors:
            found = declared.get(t.name)
            wanted_type = _ORT_TYPES.get(mc.DataType.Name(t.data_type).removeprefix("TYPE_"), "?")
            shape = _expected_shape(cfg, list(t.dims))
            if found is None:
                return f"the config's {kind} {t.name!r} is not in {name} (it has {', '.join(declared)})"
            if found.type != wanted_type or not _shape_matches(shape, list(found.shape)):
                return (f"{kind} {t.name!r} is {found.type} {list(found.shape)} in {name}, the served config says "
                        f"{wanted_type} {shape}")  # fmt: skip
            if kind == "input":
                dtype = np.dtype(object) if found.type == "tensor(string)" else None
                concrete = [1 if d == -1 else d for d in shape]
                feeds[t.name] = np.zeros(concrete, dtype=dtype or _numpy_type(found.type))
    try:
        results = session.run([o.name for o in cfg.output], feeds)
    except Exception as e:
        return f"{name} fails a smoke inference: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    for t, result in zip(cfg.output, results, strict=True):
        shape = _expected_shape(cfg, list(t.dims))
        if not _shape_matches([1 if d == -1 and i == 0 and cfg.max_batch_size > 0 else d for i, d in
                               enumerate(shape)], list(result.shape)):  # fmt: skip
            return f"output {t.name!r} of a smoke inference has shape {list(result.shape)}, the config says {shape}"
        if result.dtype.kind == "f" and not np.isfinite(result).all():
            return f"output {t.name!r} of a smoke inference is not finite"
    return None


def _numpy_type(ort_type: str) -> np.dtype:
    names = {"float": "float32", "double": "float64", "bool": "bool"}
    inner = ort_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype(names.get(inner, inner))


def is_onnx(cfg: mc.ModelConfig) -> bool:
    return cfg.backend == "onnxruntime" or cfg.platform == "onnxruntime_onnx"


def have_onnxruntime() -> bool:
    """NVIDIA's container (serve/Dockerfile) has Triton's onnxruntime backend but not the Python package."""
    return importlib.util.find_spec("onnxruntime") is not None


def verify_version(model_dir: Path, version: int) -> str | None:
    """Why ``version`` of ``model_dir`` must not be loaded, or None: see the module doc."""
    if version not in versions(model_dir):
        raise VersionsError(f"{model_dir.name} has no version {version}")
    if (reason := incomplete(model_dir / str(version))) is not None:
        return reason
    cfg = read_config(model_dir)
    if (reason := missing_model_files(model_dir, cfg)) is not None:
        return reason
    # Without onnxruntime here, the record and the labels are what is checked before Triton loads the
    # version beside the serving one and sends it a smoke inference.
    return onnx_problem(model_dir, version, cfg) if is_onnx(cfg) and have_onnxruntime() else None


def seal(model_dir: Path, version: int) -> None:
    """Write the completion record of a version copied by hand, once onnxruntime serves it under the
    model's config; raises VersionsError with the reason otherwise."""
    if version not in versions(model_dir):
        raise VersionsError(f"{model_dir.name} has no version {version}")
    cfg = read_config(model_dir)
    if is_onnx(cfg) and not have_onnxruntime():
        raise VersionsError("onnxruntime is not installed here: cannot check the copy; seal it where it is")
    if is_onnx(cfg) and (reason := onnx_problem(model_dir, version, cfg)) is not None:
        raise VersionsError(f"not sealing {model_dir.name} version {version}: {reason}")
    write_completion_record(model_dir / str(version))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--name", default="threegnet", help="the model (default threegnet)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--serve", metavar="VERSION|latest", help="serve this version (rollback), or the newest again")
    what.add_argument("--seal", type=int, metavar="VERSION", help="check a copied version, then write its record")
    what.add_argument("--check", type=int, metavar="VERSION", help="whether a running launcher would load this version")
    args = p.parse_args(argv)
    model_dir = args.model_repository / args.name
    try:
        if args.check is not None:
            reason = verify_version(model_dir, args.check)
            print(f"{args.name} version {args.check}: {reason or 'verified'}")
            return CHECK_REJECTED if reason else 0
        if args.seal is not None:
            seal(model_dir, args.seal)
            print(f"{args.name}: version {args.seal} sealed; a running launcher loads it if the policy serves it",
                  file=sys.stderr)  # fmt: skip
        if args.serve is not None:
            policy = serve(model_dir, args.serve)
            print(
                f"{args.name}: version policy now {policy}; a running serve/launch.py loads it within its poll "
                "interval (2 s by default), the old version answering until then",
                file=sys.stderr,
            )
        on_disk, served, policy = current(model_dir)
    except VersionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.name}: versions {', '.join(map(str, on_disk)) or 'none'}; policy {policy}; "
        f"served: {', '.join(map(str, served)) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
