"""A fleet on one machine, behind a real load balancer: the Kubernetes deployment rehearsed.

    python deploy/local_fleet.py --model-repository model_repository --replicas 2

starts N ``serve/launch.py`` replicas on loopback ports and HAProxy (Debian's ``haproxy``;
``make haproxy`` installs it) in front of them, with an HTTP frontend and a gRPC (HTTP/2)
frontend, and prints the URLs; Ctrl-C (or SIGTERM, SIGHUP) stops everything. Who does what
when a replica dies, as in the cluster (docs/deploy.md):

* HAProxy checks every replica's ``/v2/health/ready`` every 500 ms and takes one that fails
  out of the pool at the first failure (the readinessProbe's job); it puts it back after two
  good checks. It retries a request whose connection failed, or that got no answer, on
  another replica (``retry-on``, ``option redispatch``): the request is small enough to be
  buffered whole (``tune.bufsize``).
* The client library retries what still fails (a gRPC stream cut mid-request: UNAVAILABLE)
  with backoff and jitter.
* This fleet restarts a replica whose launcher exited (Triton died): Kubernetes'
  ``restartPolicy``. ``rolling_restart`` drains each replica in HAProxy before stopping it,
  as the Service's endpoint removal and the pod's ``preStop`` do.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve.children import Stopped, raise_on_stop_signals, spawn, stop  # noqa: E402
from serve.endpoints import READY_PATH, Addresses  # noqa: E402
from serve.server import free_port  # noqa: E402

CHECK_INTERVAL_MS = 500

HAPROXY_CONFIG = """\
global
    maxconn 4096
    tune.bufsize 65536          # a whole request fits in one buffer: needed for L7 retries
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    timeout http-request 30s
    retries 3
    option redispatch 1         # every retry goes to another replica
    retry-on conn-failure empty-response response-timeout

frontend http
    bind {host}:{http_port}
    default_backend triton_http

frontend grpc
    bind {host}:{grpc_port} proto h2
    default_backend triton_grpc

frontend stats
    bind {host}:{stats_port}
    stats enable
    stats uri /
    stats refresh 1s

backend triton_http
    balance roundrobin
    option httpchk GET {ready_path}
    http-check expect status 200
    default-server inter {interval}ms fall 1 rise 2
{http_servers}

backend triton_grpc
    balance roundrobin
    option httpchk GET {ready_path}
    http-check expect status 200
    default-server inter {interval}ms fall 1 rise 2
{grpc_servers}
"""


class FleetError(RuntimeError):
    """The fleet could not start (no haproxy, a replica that never got ready...)."""


@dataclass
class Replica:
    """One ``serve/launch.py`` on its own loopback ports."""

    name: str
    repository: Path
    log_dir: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        cmd = [sys.executable, str(ROOT / "serve" / "launch.py"), "--model-repository", str(self.repository),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--exit-timeout", "10"]  # fmt: skip
        self.starts += 1
        with (self.log_dir / f"{self.name}.log").open("a") as log:
            self.process = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{READY_PATH}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process is None or self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.log_dir / f"{self.name}.log").read_text()[-2000:]
                raise FleetError(f"replica {self.name} did not get ready:\n{log}")
            time.sleep(0.25)

    def triton_pid(self) -> int | None:
        """The ``tritonserver`` process this replica's launcher runs."""
        assert self.process is not None
        children = subprocess.run(["pgrep", "-P", str(self.process.pid), "tritonserver"],
                                  capture_output=True, text=True).stdout.split()  # fmt: skip
        return int(children[0]) if children else None

    def stop(self, grace: float = 20) -> None:
        if self.process is not None:
            stop(self.process, grace)


class Fleet(Addresses):
    """N replicas and HAProxy; see the module doc. Use as a context manager."""

    def __init__(self, repository: Path, replicas: int = 2, host: str = "127.0.0.1", restart: bool = True) -> None:
        if shutil.which("haproxy") is None:
            raise FleetError("no haproxy on PATH: install Debian's haproxy (make haproxy)")
        self.repository, self.host, self.restart = Path(repository), host, restart
        self._work = tempfile.TemporaryDirectory(prefix="threegnet-fleet-")
        self.work = Path(self._work.name)
        self.replicas = [Replica(f"r{i}", self.repository, self.work) for i in range(replicas)]
        self.http_port, self.grpc_port, self.stats_port = free_port(), free_port(), free_port()
        self.socket = self.work / "haproxy.sock"
        self.haproxy: subprocess.Popen | None = None
        self._halt = threading.Event()
        self._held: set[str] = set()  # replicas being restarted on purpose: not to be restarted by the watcher
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self.restarts = 0

    def config(self) -> str:
        def servers(port: str, h2: bool) -> str:
            lines = []
            for r in self.replicas:
                # gRPC over HTTP/2 to the replica; its health checked over HTTP/1.1 on its HTTP port.
                extra = f" proto h2 check port {r.http_port} check-proto h1" if h2 else " check"
                lines.append(f"    server {r.name} 127.0.0.1:{getattr(r, port)}{extra}")
            return "\n".join(lines)

        return HAPROXY_CONFIG.format(
            socket=self.socket, host=self.host, http_port=self.http_port, grpc_port=self.grpc_port,
            stats_port=self.stats_port, ready_path=READY_PATH, interval=CHECK_INTERVAL_MS,
            http_servers=servers("http_port", False), grpc_servers=servers("grpc_port", True),
        )  # fmt: skip

    def start(self) -> Fleet:
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_ready()
        config = self.work / "haproxy.cfg"
        config.write_text(self.config())
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise FleetError(f"haproxy rejected its configuration:\n{check.stdout}{check.stderr}")
        with (self.work / "haproxy.log").open("w") as log:
            self.haproxy = spawn(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while set(self.states().values()) != {"UP"}:  # every replica in both backends (none while starting)
            if self.haproxy.poll() is not None or time.monotonic() > deadline:
                raise FleetError(f"haproxy did not come up:\n{(self.work / 'haproxy.log').read_text()[-2000:]}")
            time.sleep(0.2)
        self._watcher.start()
        return self

    def _stats(self, column: str) -> dict[tuple[str, str], str]:
        """(backend, replica) -> one column of HAProxy's stats CSV."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.stats_port}/;csv", timeout=2) as r:
                text = r.read().decode().lstrip("# ")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text))
        return {(row["pxname"], row["svname"]): row[column]
                for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")}  # fmt: skip

    def states(self) -> dict[tuple[str, str], str]:
        """(backend, replica) -> HAProxy's status of it: UP, DOWN, DRAIN, ..."""
        return {key: status.split()[0] for key, status in self._stats("status").items()}

    def sessions(self) -> dict[tuple[str, str], int]:
        """(backend, replica) -> how many connections (HTTP) or streams (gRPC) HAProxy sent it."""
        return {key: int(total or 0) for key, total in self._stats("stot").items()}

    def replica_state(self, name: str) -> set[str]:
        return {status for (_, server), status in self.states().items() if server == name}

    def admin(self, command: str) -> str:
        """A command on HAProxy's runtime API (its stats socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.socket))
            s.sendall(command.encode() + b"\n")
            return s.makefile().read()

    def _watch(self) -> None:
        """Restart a replica whose launcher exited (Triton died): Kubernetes' restartPolicy."""
        while not self._halt.wait(0.5):
            for r in self.replicas:
                if self.restart and r.name not in self._held and r.process is not None and r.process.poll() is not None:
                    print(f"[fleet] replica {r.name} exited ({r.process.returncode}); restarting it", file=sys.stderr)
                    r.start()
                    self.restarts += 1

    def rolling_restart(self, wait_up: float = 180) -> None:
        """Restart the replicas one by one: drain in HAProxy, wait for its sessions to end, stop,
        start, wait until HAProxy has it UP again, then the next."""
        for r in self.replicas:
            self._held.add(r.name)
            try:
                for backend in ("triton_http", "triton_grpc"):
                    self.admin(f"set server {backend}/{r.name} state drain")
                time.sleep(2 * CHECK_INTERVAL_MS / 1000)  # let requests already sent to it finish
                r.stop()
                r.start()
                r.wait_ready()
                for backend in ("triton_http", "triton_grpc"):
                    self.admin(f"set server {backend}/{r.name} state ready")
                deadline = time.monotonic() + wait_up
                while self.replica_state(r.name) != {"UP"}:
                    if time.monotonic() > deadline:
                        raise FleetError(f"replica {r.name} did not rejoin: {self.states()}")
                    time.sleep(0.2)
            finally:
                self._held.discard(r.name)

    def stop(self) -> None:
        self._halt.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        if self.haproxy is not None:
            stop(self.haproxy, 5)
        for r in self.replicas:
            r.stop()
        with contextlib.suppress(OSError):
            self._work.cleanup()

    def __enter__(self) -> Fleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--replicas", type=int, default=2)
    args = p.parse_args(argv)
    raise_on_stop_signals()
    try:
        with Fleet(args.model_repository, args.replicas) as fleet:
            print(
                f"fleet of {args.replicas} replicas behind HAProxy:\n"
                f"  HTTP   http://{fleet.http_url}\n  gRPC   {fleet.grpc_url}\n"
                f"  stats  http://{fleet.host}:{fleet.stats_port}/\nCtrl-C to stop.",
                file=sys.stderr,
            )
            while True:
                time.sleep(1)
    except FleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"{e}: fleet stopped", file=sys.stderr)
        return 0 if e.signum == signal.SIGINT else 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
