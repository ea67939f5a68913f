"""Starting, watching and stopping a real Triton Inference Server process.

Finds ``tritonserver`` on PATH (as inside NVIDIA's container) or else the one that
ships in the ``nvidia-pytriton`` wheel, which needs its library folder on
``LD_LIBRARY_PATH`` and a backend folder holding the python backend stub for the
running Python. Used by ``serve/launch.py``, the tests, the benchmarks and the demo.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from export.triton_config import parse_pbtxt
from serve.children import spawn
from serve.control import INFERENCE_KEY_HEADER, Lock, grpc_headers, http_headers, resolve_key, secret_args_library
from serve.endpoints import (
    CONTROL_KEY_ENV,
    CONTROL_KEY_FILE_ENV,
    EXIT_TIMEOUT_S,
    GRPC_PORT,
    HTTP_PORT,
    MAX_REQUEST_MB,
    METRICS_PATH,
    METRICS_PORT,
    READY_PATH,
    Addresses,
)
from serve.front import FRONT_HOST, Front, FrontError, haproxy_pem
from serve.metrics import MetricsServer
from serve.readiness import readiness
from serve.standin import build_shadow_repository, model_dirs
from serve.supervisor import Supervisor

# Lines of Triton's log that are noise on a machine without a GPU.
_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "DCGM unable to start")
_ERROR_LINE = re.compile(r"^(E\d{4} |error: |Error: )")
# glibc malloc settings for tritonserver and the python-backend stubs (they inherit its environment; its own
# MALLOC_* win): a fixed mmap threshold gives large request and decode buffers back when freed, two arenas
# bound what the HTTP threads hold, so memory returns after bursts of camera photos (measured, with the
# price: docs/performance.md#memory-after-bursts-of-camera-photos-the-malloc-settings).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "262144", "MALLOC_TRIM_THRESHOLD_": "1048576"}


# The python backend's shared-memory regions (a /dev/shm file per stub, 1 MiB and growing with the largest
# batch) outlive a tritonserver that is killed (SIGKILL, abort, the OOM killer). Each run names its own
# (docs/operations.md#shared-memory-left-behind): removed by their owner once Triton has exited, and by a
# later start when the run's lock is free, which proves that no process of that run is left.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "threegnet_triton_"
SHM_PREFIX_OPTION = "shm-region-prefix-name="
_SHM_LOCK = re.compile(rf"^({SHM_PREFIX}\d+_[0-9a-f]+_)lock$")


class ShmRegions:
    """One server run's regions: ``PREFIX<owner pid>_<random>_<Triton's uuid>``, and the run's lock file
    ``PREFIX<owner pid>_<random>_lock``, flock-ed here and inherited by tritonserver (``fd``), so that it
    is held while the owner, tritonserver or a stub runs. An flock is the kernel's: it holds across pid
    namespaces and containers sharing /dev/shm, where a pid in a name would prove nothing."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = directory
        self.prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"
        self.fd: int | None = None
        staged = directory / f"{self.prefix}lock.new"  # renamed once locked: no sweep sees it unlocked
        try:
            fd = os.open(staged, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return  # no lock (an unwritable /dev/shm fails Triton's own start anyway): the owner alone cleans
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(staged, directory / f"{self.prefix}lock")
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                staged.unlink()
            return
        self.fd = fd

    def remove(self) -> None:
        """After Triton has exited: the regions, then the lock."""
        _remove_run(self.directory, self.prefix)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _remove_run(directory: Path, prefix: str) -> tuple[int, int]:
    """Unlink a run's regions of this user, its lock last; (regions, bytes) freed. A process that still
    maps a region keeps its pages until it unmaps them."""
    count = freed = 0
    paths = sorted(directory.glob(f"{prefix}*"), key=lambda path: path.name == f"{prefix}lock")
    for path in paths:
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                path.unlink()
                count, freed = count + (path.name != f"{prefix}lock"), freed + st.st_blocks * 512
    return count, freed


def remove_stale_regions(directory: Path = SHM_DIR) -> tuple[int, int]:
    """Remove the regions of runs that are over: those whose lock file (this user's) nobody holds any
    more. A run whose lock is held (a tritonserver still draining after its owner died included),
    another user's, a region without a lock, and Triton's default names are left alone. (regions, bytes)."""
    count = freed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0, 0
    for name in names:
        if (m := _SHM_LOCK.match(name)) is None:
            continue
        try:
            fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and _try_lock(fd):
                run_count, run_freed = _remove_run(directory, m[1])
                count, freed = count + run_count, freed + run_freed
        finally:
            os.close(fd)
    return count, freed


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: a process of that run is alive
        return False
    return True


class ServerError(RuntimeError):
    """Triton could not be started or stopped; the message carries Triton's reason."""


@dataclass
class ServerBinary:
    """A ``tritonserver`` executable and what it needs to run."""

    executable: Path
    origin: str
    has_onnxruntime: bool
    env: dict[str, str] = field(default_factory=dict)
    wheel_backends: Path | None = None  # the wheel's backends/ (its python stub lives elsewhere)
    wheel_stubs: Path | None = None


@dataclass(frozen=True)
class GrpcTls:
    """gRPC over TLS (terminated by the front when there is one, else by Triton's own flags); mutual TLS
    (a client needs a certificate that ``client_ca`` signed) when ``client_ca`` is given. Triton's HTTP has
    no TLS: terminate it in front."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        for what, path in (("certificate", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"gRPC TLS {what} {path}: no such file")

    def triton_args(self) -> list[str]:
        self.check()
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.client_ca is not None:
            args += [f"--grpc-root-cert={self.client_ca}", "--grpc-use-ssl-mutual=true"]
        return args


def find_server(explicit: str | os.PathLike | None = None) -> ServerBinary:
    """``explicit``, else ``tritonserver`` on PATH, else the ``nvidia-pytriton`` wheel's."""
    path = Path(explicit) if explicit else (Path(p) if (p := shutil.which("tritonserver")) else None)
    if path is not None:
        if not path.exists():
            raise ServerError(f"{path}: no such tritonserver executable")
        backends = path.resolve().parent.parent / "backends"
        return ServerBinary(path, f"{path}", has_onnxruntime=(backends / "onnxruntime").is_dir())
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("no tritonserver on PATH and the nvidia-pytriton wheel is not installed (run make setup)")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    ld_path = [str(libs), sysconfig.get_config_var("LIBDIR") or "", os.environ.get("LD_LIBRARY_PATH", "")]
    # The python backend stub takes its sys.path from the first python3 on PATH: make it ours,
    # so the models see this environment's packages (numpy, Pillow, onnxruntime).
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    return ServerBinary(
        executable=root / "bin" / "tritonserver",
        origin="the nvidia-pytriton wheel",
        has_onnxruntime=False,
        env={
            "LD_LIBRARY_PATH": os.pathsep.join(p for p in ld_path if p),
            "PATH": os.pathsep.join(p for p in path if p),
        },
        wheel_backends=root / "backends",
        wheel_stubs=root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}",
    )


def gpu_present() -> bool:
    """A GPU that onnxruntime can use (the driver's device node and the CUDA provider)."""
    if not Path("/dev/nvidiactl").exists():
        return False
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


PORT_IN_USE = "in use"


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` (IPv4 or IPv6), or None when it can."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        return f"cannot resolve the host {host!r} ({e.strerror})"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return PORT_IN_USE
            if e.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return f"cannot listen on {host}:{port} ({e.strerror})"
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def port_in_use(host: str, port: int) -> bool:
    return bind_problem(host, port) == PORT_IN_USE


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` ports free on ``host``, all different: held open together while they are picked (one at
    a time, the kernel may hand the same free port out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
                   for _ in range(count)]  # fmt: skip
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


class TritonServer(Addresses):
    """A Triton server process bound to ``host`` (127.0.0.1 unless told otherwise).

    Use as a context manager, or ``start()`` / ``wait_ready()`` / ``stop()``.
    ``log`` receives every line Triton prints (default: dropped; the launcher
    echoes them); the last lines are kept for error messages either way.

    HTTP and gRPC clients reach Triton through a :class:`~serve.front.Front` (HAProxy) that refuses
    the bodies Triton 2.51 cannot bound, larger than ``max_request_mb`` or compressed; Triton itself
    then listens on loopback ports of its own. ``max_request_mb=0``: no front, no cap.

    Models are under explicit control (all loaded at start). Triton reads a shadow of
    a local repository that holds only the verified versions of ONNX models (a
    broken newest version must not keep a server from coming up serving the previous
    one); once the server is ready, a :class:`~serve.supervisor.Supervisor` reloads a
    model whose backend process died (``heal``) and loads what changes in the
    repository, checked every ``poll_secs`` (0: never).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        host: str = "127.0.0.1",
        http_port: int = HTTP_PORT,
        grpc_port: int = GRPC_PORT,
        metrics_port: int = METRICS_PORT,
        server: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = None,
        log_verbose: int = 0,
        exit_timeout: int = EXIT_TIMEOUT_S,
        extra_args: list[str] | None = None,
        heal: bool = True,
        poll_secs: float = 2.0,
        control_key: str | None = None,
        inference_key: str | None = None,
        grpc_tls: GrpcTls | None = None,
        public: tuple[str, ...] = (),
        supervisor_metrics_port: int | None = None,
        pins: Path | None = None,
        max_request_mb: int = MAX_REQUEST_MB,
    ) -> None:
        # Object storage (s3://, gs://, as://) is read by Triton itself: nothing to check or shadow here.
        self.remote = "://" in str(model_repository)
        self.repository_url = str(model_repository)
        self.repository = Path(model_repository)
        self.host, self.http_port, self.grpc_port, self.metrics_port = (
            host,
            http_port,
            grpc_port,
            metrics_port,
        )
        self.server_path = server
        self.log = log
        self.log_verbose = log_verbose
        self.exit_timeout = exit_timeout  # how long shutdown waits for in-flight requests and open connections
        self.extra_args = list(extra_args or [])
        self.heal, self.poll_secs = heal, poll_secs
        if control_key is None:
            control_key, self.control_key_origin = resolve_key()
        else:
            self.control_key_origin = "the caller"
        self.lock = Lock(control_key, inference_key, public)
        self.grpc_tls = grpc_tls
        self.supervisor_metrics_port = supervisor_metrics_port  # None: not served (serve/metrics.py)
        self.pins = pins  # this server's version pins (serve/rollouts.py): a canary's
        self.max_request_mb = max_request_mb
        self.front: Front | None = None  # HAProxy on the public HTTP and gRPC ports, when it runs
        self.triton_http_port, self.triton_grpc_port = http_port, grpc_port  # Triton's own: loopback behind a front
        self._stopping = False
        self._metrics_server: MetricsServer | None = None
        self.secrets_hidden = True  # False when no secret_args library could be had (see serve/control.py)
        self.supervisor: Supervisor | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.process: subprocess.Popen | None = None
        self.standin_models: list[str] = []
        self.binary: ServerBinary | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self.shadow: Path | None = None  # what Triton reads: verified versions, stand-in configs (serve/standin.py)
        self._reader: threading.Thread | None = None
        self.shm: ShmRegions | None = None  # this run's python-backend regions; None: the caller names them

    @classmethod
    def on_free_ports(cls, model_repository: str | os.PathLike, **kwargs) -> TritonServer:
        """A server (not started) whose HTTP, gRPC and metrics ports are free ones on its host."""
        host = kwargs.get("host", "127.0.0.1")
        ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3, host), strict=True))
        return cls(model_repository, **ports, **kwargs)

    # -- addresses and keys ----------------------------------------------------------------
    @property
    def supervisor_metrics_url(self) -> str | None:
        if self.supervisor_metrics_port is None:
            return None
        return f"http://{self.url_host}:{self.supervisor_metrics_port}{METRICS_PATH}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.url_host}:{self.metrics_port}{METRICS_PATH}"

    @property
    def control_headers(self) -> dict[str, str]:
        """What an HTTP request to the control plane (load, unload, config, statistics...) carries."""
        return http_headers(self.lock.control_key)

    @property
    def grpc_control_headers(self) -> dict[str, str]:
        """The same as gRPC metadata."""
        return grpc_headers(self.lock.control_key)

    @property
    def triton_http_url(self) -> str:
        """Triton's own HTTP address (behind the front, if any): what the launcher itself talks to."""
        return f"{FRONT_HOST}:{self.triton_http_port}" if self.front is not None else self.http_url

    # -- lifecycle -------------------------------------------------------------------------
    def _check_repository(self) -> None:
        if self.remote:
            return
        if not self.repository.is_dir():
            raise ServerError(f"{self.repository}: no such model repository")
        configs = [p / "config.pbtxt" for p in model_dirs(self.repository) if (p / "config.pbtxt").exists()]
        if not configs:
            raise ServerError(
                f"{self.repository}: no model with a config.pbtxt in it "
                "(export one with python export/to_onnx.py --checkpoint CKPT --output-dir DIR)"
            )
        for config in configs:
            try:
                parse_pbtxt(config.read_text())
            except (text_format.ParseError, UnicodeDecodeError, OSError) as e:
                raise ServerError(f"{config}: not a Triton model config ({str(e).splitlines()[0]})") from None

    def _command(self) -> list[str]:
        assert self.binary is not None and self._workdir is not None
        work = Path(self._workdir.name)
        repository: Path | str = self.repository_url if self.remote else self.repository.resolve()
        cmd = [str(self.binary.executable)]
        if self.binary.wheel_backends is not None:
            backends = work / "backends"
            shutil.copytree(self.binary.wheel_backends, backends, ignore=shutil.ignore_patterns("__pycache__"))
            stub = self.binary.wheel_stubs / "triton_python_backend_stub" if self.binary.wheel_stubs else None
            if stub is None or not stub.exists():
                raise ServerError(f"no python backend stub for Python {sys.version_info[:2]} in {self.binary.origin}")
            shutil.copy2(stub, backends / "python" / stub.name)
            cmd += ["--backend-directory", str(backends)]
        if self.remote and not self.binary.has_onnxruntime:
            raise ServerError(f"{self.repository_url}: a remote repository needs Triton's onnxruntime backend "
                              "(NVIDIA's container); this server has none")  # fmt: skip
        supervised = not self._user_control_mode()
        if not self.remote and (supervised or not self.binary.has_onnxruntime):
            # Triton reads a shadow: the stand-in's configs where it has no onnxruntime backend, and under the
            # supervisor only the versions it verified (serve/standin.py)
            assert isinstance(repository, Path)
            self.shadow = work / "repository"
            self.standin_models = build_shadow_repository(
                repository, self.shadow, gpu=gpu_present(), verified=supervised, standin=not self.binary.has_onnxruntime
            )
            repository = self.shadow
            if supervised:  # only verified versions in the shadow before Triton loads it (serve/rollouts.py)
                self.supervisor = self._make_supervisor()
                if errors := self.supervisor.prepare():
                    raise ServerError("\n  ".join(errors))
        control = ["--model-control-mode=explicit", "--load-model=*"] if supervised else []
        lock = self.lock.triton_args()
        if (shim := secret_args_library(work)) is not None:
            self.binary.env["LD_PRELOAD"] = " ".join(p for p in (str(shim), os.environ.get("LD_PRELOAD")) if p)
            self.binary.env.update(self.lock.env)
        else:  # no compiler and no prebuilt library: the keys go on the command line as they are
            self.secrets_hidden = False
            for name, value in self.lock.env.items():
                lock = [a.replace(f"@env:{name}", value) for a in lock]
        tls = self.grpc_tls.triton_args() if self.grpc_tls is not None and self.front is None else []
        http_address = FRONT_HOST if self.front is not None else self._evhtp_address
        grpc_address = FRONT_HOST if self.front is not None else self.url_host
        return [
            *cmd,
            "--model-repository", str(repository),
            "--http-address", http_address, "--http-port", str(self.triton_http_port),
            "--grpc-address", grpc_address, "--grpc-port", str(self.triton_grpc_port),
            "--metrics-address", self._evhtp_address, "--metrics-port", str(self.metrics_port),
            "--log-verbose", str(self.log_verbose),
            # Latency quantiles on: p99 is a query (docs/monitoring.md), not a guess.
            *([] if self._user_flag("--metrics-config") else ["--metrics-config", "summary_latencies=true"]),
            "--exit-timeout-secs", str(self.exit_timeout),
            *([f"--backend-config=python,{SHM_PREFIX_OPTION}{self.shm.prefix}"] if self.shm else []),
            *control,
            *lock,
            *tls,
            *self.extra_args,
        ]  # fmt: skip

    @property
    def _evhtp_address(self) -> str:
        """How Triton's HTTP and metrics servers (libevhtp) take an address: IPv6 with an ``ipv6:`` prefix."""
        return f"ipv6:{self.host}" if ":" in self.host else self.host

    def _user_flag(self, flag: str) -> bool:
        return any(a.startswith(flag) for a in self.extra_args)

    def _user_control_mode(self) -> bool:
        return self._user_flag("--model-control-mode")

    def start(self) -> TritonServer:
        self._check_repository()
        ports = {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}
        if self.supervisor_metrics_port is not None:
            ports["supervisor-metrics"] = self.supervisor_metrics_port
        if len(set(ports.values())) < len(ports):
            listing = ", ".join(f"--{name.lower()}-port {port}" for name, port in ports.items())
            raise ServerError(f"the ports must differ: {listing}")
        for name, port in ports.items():
            problem = bind_problem(self.host, port)
            if problem == PORT_IN_USE:
                raise ServerError(
                    f"{name} port {port} on {self.host} is already in use (another server?); "
                    f"choose another with --{name.lower()}-port"
                )
            if problem is not None:
                raise ServerError(f"--host {self.host}: {problem}")
        self.binary = find_server(self.server_path)
        self._sweep_regions()
        # A prefix given after -- is the caller's: theirs to clean, so neither replaced nor removed here.
        self.shm = None if any(SHM_PREFIX_OPTION in a for a in self.extra_args) else ShmRegions()
        self._workdir = tempfile.TemporaryDirectory(prefix="threegnet-triton-")
        try:
            self._start_front()
            cmd = self._command()
        except BaseException:
            self._cleanup()
            raise
        self.process = spawn(
            cmd,
            new_session=True,  # our own process group: signals reach the stubs too
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._environment(),
            text=True,
            errors="replace",
            pass_fds=(self.shm.fd,) if self.shm is not None and self.shm.fd is not None else (),  # the run's lock
        )
        if self.supervisor is not None:
            self.supervisor.server_pid = self.process.pid
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        if self.front is not None:
            threading.Thread(target=self._watch_front, daemon=True).start()
        return self

    def _start_front(self) -> None:
        """HAProxy on the public ports, Triton moved to loopback ports behind it; without haproxy, a server
        that only this machine reaches goes on uncapped (with a warning), any other is refused."""
        if self.max_request_mb <= 0:
            return
        if shutil.which("haproxy") is None:
            if not is_loopback(self.host):
                raise ServerError(
                    f"--host {self.host} serves other machines, and with no haproxy on PATH request bodies would "
                    "reach Triton uncapped (one 2 GiB body aborts it): install haproxy (make haproxy), or pass "
                    "--max-request-mb 0 to serve without the cap (docs/security.md#the-caps-in-front-of-triton)"
                )
            (self.log or self.lines.append)(
                "[launcher] warning: no haproxy on PATH: request bodies are not capped (install haproxy; "
                "docs/security.md#the-caps-in-front-of-triton)"
            )
            return
        assert self._workdir is not None
        work = Path(self._workdir.name)
        tls = None
        if self.grpc_tls is not None:
            self.grpc_tls.check()
            tls = (haproxy_pem(self.grpc_tls.cert, self.grpc_tls.key, work), self.grpc_tls.client_ca)
        self.triton_http_port, self.triton_grpc_port = free_ports(2, FRONT_HOST)
        front = Front(self.host, self.http_port, self.grpc_port, self.triton_http_port, self.triton_grpc_port,
                      self.max_request_mb, work, tls)  # fmt: skip
        try:
            self.front = front.start()
        except FrontError as e:
            raise ServerError(str(e)) from None

    def _watch_front(self) -> None:
        """A front that dies leaves Triton unreachable: stop Triton too, so that the launcher exits and its
        owner (Kubernetes, the fleet) restarts the server."""
        assert self.front is not None and self.front.process is not None and self.process is not None
        status = self.front.process.wait()
        if not self._stopping and self.process.poll() is None:
            (self.log or self.lines.append)(
                f"[launcher] the request front (haproxy) exited ({status}): stopping Triton"
            )
            self.process.send_signal(signal.SIGTERM)

    def _environment(self) -> dict[str, str]:
        """Ours, less the operators' key as the launcher was given it: Triton and the backends it starts
        get it only through the lock's own variables, which the preloaded library removes again."""
        assert self.binary is not None
        env = {k: v for k, v in os.environ.items() if k not in (CONTROL_KEY_ENV, CONTROL_KEY_FILE_ENV)}
        return {**MALLOC_ENV, **env, **self.binary.env}

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self.log is not None:
                self.log(line)

    def errors(self) -> list[str]:
        """Triton's error lines so far, without the no-GPU noise."""
        return [ln for ln in self.lines if _ERROR_LINE.match(ln) and not any(n in ln for n in _NOISE)]

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        url = f"http://{self.http_url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def is_ready(self) -> bool:
        try:
            return self._get(READY_PATH)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 300.0) -> TritonServer:
        """Block until the server and all its models are ready; raise with Triton's reason
        if it exits or does not get there in ``timeout`` seconds."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                reasons = self.errors() or list(self.lines)[-15:]
                self._cleanup()
                raise ServerError(
                    f"tritonserver exited with status {self.process.returncode}:\n  " + "\n  ".join(reasons)
                )
            if self.is_ready():
                if not self._user_control_mode():
                    self._check_lock()
                    self._supervise()
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n  " + "\n  ".join(self.errors()))

    def _supervise(self) -> None:
        if self._user_control_mode() or not (self.heal or self.poll_secs > 0):
            return
        assert self.process is not None
        if self.supervisor is None:
            self.supervisor = self._make_supervisor()
        if not self.supervisor.is_alive():
            self.supervisor.server_pid = self.process.pid
            self.supervisor.start()
        if self.supervisor_metrics_port is not None and self._metrics_server is None:
            try:
                supervisor = self.supervisor
                self._metrics_server = MetricsServer(
                    supervisor, self.host, self.supervisor_metrics_port,
                    ready=lambda: readiness(
                        self.triton_http_url, supervisor.models, self.control_headers,
                        rolling_out=lambda: supervisor.rolling_out,
                    ),
                )  # fmt: skip
            except OSError as e:
                self.stop()
                raise ServerError(f"supervisor metrics port {self.supervisor_metrics_port}: {e.strerror}") from None

    def _make_supervisor(self) -> Supervisor:
        infer_headers = None
        if self.lock.inference_key is not None:
            infer_headers = http_headers(self.lock.inference_key, INFERENCE_KEY_HEADER)
        return Supervisor(
            self.triton_http_url,
            self.process.pid if self.process is not None else 0,  # set once Triton runs
            None if self.remote else self.repository.resolve(),
            self.shadow,
            gpu=gpu_present(),
            standin=not (self.binary is not None and self.binary.has_onnxruntime),
            poll_secs=0 if self.remote else self.poll_secs,  # a remote repository: roll out by restarting pods
            heal=self.heal,
            log=self.log or (lambda line: self.lines.append(line)),
            headers=self.control_headers,
            infer_headers=infer_headers,
            pins=self.pins,
        )

    def models(self) -> list[dict]:
        """The repository index: name, version and state of every model (asked with the operators' key)."""
        req = urllib.request.Request(
            f"http://{self.triton_http_url}/v2/repository/index",
            data=b"{}",
            method="POST",
            headers=self.control_headers,
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def _check_lock(self) -> None:
        """The key Triton expects is the one we hold (a secret_args library that failed to load would
        leave Triton expecting the placeholder): otherwise no one could operate the server."""
        try:
            self.models()
        except urllib.error.HTTPError as e:
            self.stop()
            raise ServerError(
                f"tritonserver does not accept the operators' key (HTTP {e.code}): its control plane would be "
                "unusable; is serve/secret_args.c's library loadable here?"
            ) from None

    def stop(self, timeout: float | None = None) -> int | None:
        """Graceful shutdown (SIGTERM: Triton finishes in-flight requests), then SIGKILL
        for anything left in the server's process group. Returns the exit status."""
        if self.process is None:
            return None
        self._stopping = True
        if self.supervisor is not None:  # first: stubs exiting at shutdown are no crash to heal
            self.supervisor.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout if timeout is not None else self.exit_timeout + 30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stubs and anything else left behind
        self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._cleanup()
        return self.process.returncode

    @property
    def shm_prefix(self) -> str | None:
        """The name prefix of this run's python-backend regions in /dev/shm (None: the caller's own)."""
        return self.shm.prefix if self.shm is not None else None

    def _sweep_regions(self) -> None:
        """Remove what runs that are over left in /dev/shm (see :func:`remove_stale_regions`)."""
        count, freed = remove_stale_regions()
        if count:
            (self.log or self.lines.append)(
                f"[launcher] removed {count} shared-memory regions ({freed / (1 << 20):.0f} MiB) "
                f"left in {SHM_DIR} by servers that are gone"
            )

    def _cleanup(self) -> None:
        """After Triton has exited, however it exited: the front, its work dir and its shared-memory regions."""
        if self.front is not None:
            self._stopping = True
            self.front.stop()
        if self.shm is not None and (self.process is None or self.process.poll() is not None):
            self.shm.remove()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
