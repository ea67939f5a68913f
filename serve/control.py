"""The operators' key: who may change what a Triton server serves.

Triton answers its whole API to anyone who reaches its ports, and in the explicit
model-control mode the launcher runs it in, its repository API loads models from files
sent with the request: code execution for any client (Triton's "Secure Deployment
Considerations"). The launcher therefore restricts, with Triton's own
``--http-restricted-api`` / ``--grpc-restricted-protocol``, every category a client has
no business using to requests that carry the operators' key (docs/security.md). The
data plane (inference, health, metadata) stays open unless an inference key is given too.

The key is never put on tritonserver's command line as it is (every local user can read
that): the arguments name environment variables, and ``secret_args.c``, preloaded into
the server, puts the values in before Triton parses them.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from serve.endpoints import CONTROL_KEY_ENV, CONTROL_KEY_FILE_ENV, CONTROL_KEY_HEADER

# Triton's API categories behind the operators' key: loading and unloading models (with code sent in the
# request), model configs, shared-memory regions (a client could map server memory), statistics, trace and
# logging settings. What stays open: health, metadata, inference.
RESTRICTED = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
# What an operator may open to everyone (--public): the read-only categories (Triton's stock example clients
# and perf_analyzer read model configs). Never what changes the server: loading models is code execution,
# shared memory lets a client name regions the server reads and writes.
MAY_BE_PUBLIC = ("model-config", "statistics")
INFERENCE_KEY_HEADER = "inference-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # how Triton's gRPC frontend names a restricted protocol's metadata
# What a key may hold: enough for hex, base64 and token_urlsafe keys, nothing that Triton's "KEY=VALUE"
# argument syntax or an HTTP header would split.
_KEY = re.compile(r"[A-Za-z0-9._~+/-]{16,512}=*")
_SHIM_SOURCE = Path(__file__).with_name("secret_args.c")
SHIM_ENV = "THREEGNET_SECRET_ARGS_LIB"  # a prebuilt secret_args.so (the container builds one)
_SECRET_ENV = "THREEGNET_TRITON_SECRET_{}"  # what the arguments name; removed again inside the server


class ControlKeyError(ValueError):
    """A key file that cannot be read or a key that cannot be used; the message names the file, never the key."""


def read_key(path: str | os.PathLike, what: str = "control key") -> str:
    """The key in ``path`` (surrounding whitespace dropped); checked, never echoed."""
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise ControlKeyError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    return check_key(key, f"the {what} in {path}")


def check_key(key: str, where: str) -> str:
    if not _KEY.fullmatch(key):
        raise ControlKeyError(
            f"{where} is not usable: it needs 16 to 512 characters of A-Z a-z 0-9 . _ ~ + / - "
            "(e.g. openssl rand -hex 32)"
        )
    return key


def key_from_environment(file_env: str = CONTROL_KEY_FILE_ENV, value_env: str = CONTROL_KEY_ENV) -> str | None:
    """The key the environment names: the file in ``file_env``, else the value of ``value_env``, else None."""
    if path := os.environ.get(file_env):
        return read_key(path)
    if value := os.environ.get(value_env):
        return check_key(value.strip(), f"${value_env}")
    return None


def resolve_key(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """(key, where it came from): ``path``, else the environment, else a random key for this run."""
    if path is not None:
        return read_key(path), str(path)
    key = key_from_environment()
    if key is not None:
        return key, f"${CONTROL_KEY_FILE_ENV}" if os.environ.get(CONTROL_KEY_FILE_ENV) else f"${CONTROL_KEY_ENV}"
    return secrets.token_urlsafe(32), "a random key for this run"


def http_headers(key: str, header: str = CONTROL_KEY_HEADER) -> dict[str, str]:
    """What an HTTP request carries to pass the lock."""
    return {header: key}


def grpc_headers(key: str, header: str = CONTROL_KEY_HEADER) -> dict[str, str]:
    """What a gRPC request carries (as metadata) to pass the lock."""
    return {GRPC_HEADER_PREFIX + header: key}


@dataclass
class Lock:
    """The restriction arguments for one tritonserver, and the environment that fills them in."""

    control_key: str
    inference_key: str | None = None
    public: tuple[str, ...] = ()  # categories of MAY_BE_PUBLIC left open
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if unknown := set(self.public) - set(MAY_BE_PUBLIC):
            raise ControlKeyError(f"cannot open {', '.join(sorted(unknown))}: only {', '.join(MAY_BE_PUBLIC)}")

    @property
    def restricted(self) -> tuple[str, ...]:
        return tuple(c for c in RESTRICTED if c not in self.public)

    def _group(self, categories: tuple[str, ...], header: str, key: str, n: int) -> str:
        name = _SECRET_ENV.format(n)
        self.env[name] = key
        return f"{','.join(categories)}:{header}=@env:{name}"

    def triton_args(self) -> list[str]:
        self.env.clear()
        groups = [self._group(self.restricted, CONTROL_KEY_HEADER, self.control_key, 0)]
        if self.inference_key is not None:
            groups.append(self._group(("inference",), INFERENCE_KEY_HEADER, self.inference_key, 1))
        return [a for g in groups for a in (f"--http-restricted-api={g}", f"--grpc-restricted-protocol={g}")]


def secret_args_library(workdir: Path) -> Path | None:
    """``secret_args.so``: the prebuilt one ``$THREEGNET_SECRET_ARGS_LIB`` names, else compiled into
    ``workdir`` with the C compiler on PATH; None when there is neither."""
    if (prebuilt := os.environ.get(SHIM_ENV)) and Path(prebuilt).is_file():
        return Path(prebuilt)
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None:
        return None
    digest = hashlib.sha256(_SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    out = workdir / f"secret_args-{digest}.so"
    build = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(out), str(_SHIM_SOURCE)], capture_output=True, text=True
    )
    return out if build.returncode == 0 and out.exists() else None
