"""A fleet on one machine, behind a real load balancer: the Kubernetes deployment rehearsed.

    python deploy/local_fleet.py --model-repository model_repository --replicas 2

starts N ``serve/launch.py`` replicas on loopback ports and HAProxy (Debian's ``haproxy``;
``make haproxy`` installs it) in front of them, with an HTTP frontend and a gRPC (HTTP/2)
frontend, and prints the URLs; Ctrl-C (or SIGTERM, SIGHUP) stops everything. Who does what
when a replica dies, as in the cluster (docs/deploy.md):

* HAProxy checks every replica's ``/v2/health/ready`` every 500 ms and takes one that fails,
  or that says nothing for a second (hung), out of the pool at the first failure (the
  readinessProbe's job); it puts it back after two good checks. It retries a request whose
  connection failed, that got no answer, a 503, or no answer within ``UPSTREAM_TIMEOUT_S`` (a
  hung replica) on another replica (``retry-on``, ``option redispatch``), over HTTP and gRPC
  alike: a request small enough to be buffered whole (``tune.bufsize``); the timeouts are sized
  from measured service times (docs/deploy.md "When a pod hangs").
* The client library retries what still fails (a gRPC stream cut mid-request: UNAVAILABLE)
  with backoff and jitter.
* This fleet restarts a replica whose launcher exited (Triton died): Kubernetes'
  ``restartPolicy``. ``rolling_restart`` drains each replica in HAProxy before stopping it,
  as the Service's endpoint removal and the pod's ``preStop`` do.
* Each replica has its own version pins file (``--version-pins``), empty unless
  ``deploy/canary.py`` makes the replica a canary; ``fleet.json`` in the fleet's folder tells
  that tool where everything is.

With ``--prometheus`` (on in ``make fleet``) Debian's ``prometheus`` (``make prometheus``) runs beside it on
a loopback port, scraping every replica's metrics ports (Triton's and the launcher's) each second and
evaluating the fleet's alert rules (``deploy/kubernetes/monitoring/rules.yml``): what the cluster's
Prometheus does with the ServiceMonitor and the PrometheusRule (docs/monitoring.md). The replicas then report latency
quantiles too (Triton's ``--metrics-config summary_latencies=true``).

Locked as the cluster is (docs/security.md): the replicas share one operators' key (from
``--control-key-file`` or the environment, as the launcher reads it; else random for this run),
and HAProxy forwards only the data plane (inference, health, metadata), so the control plane is
reachable only on the replicas' own ports. With ``--tls-cert``/``--tls-key`` it serves HTTPS and
gRPC over TLS (``--tls-client-ca``: mutual TLS), as the Ingress does.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from serve.children import NotAnswering, Stopped, raise_on_stop_signals, spawn, stop, wait_http_ok
from serve.control import ControlKeyError, grpc_headers, http_headers, resolve_key
from serve.endpoints import (
    CONTROL_KEY_ENV,
    DATA_PLANE_GRPC_METHODS,
    MAX_REQUEST_MB,
    METRICS_PATH,
    READY_PATH,
    UPSTREAM_ATTEMPTS,
    UPSTREAM_TIMEOUT_S,
    Addresses,
)
from serve.front import HTTP_BODY_RULES, MAX_REQUEST_MB_LIMIT, MIB, grpc_body_rules, haproxy_pem, tls_bind
from serve.server import free_port, free_ports

ROOT = Path(__file__).resolve().parents[1]

CHECK_INTERVAL_MS = 500
# A health check with no answer after this long fails (a frozen replica accepts the connection and says
# nothing): out of the pool within CHECK_INTERVAL_MS + CHECK_TIMEOUT_MS, well before UPSTREAM_TIMEOUT_S, so
# that the retry of a request it held finds it gone. 16x the slowest check measured under full load (61 ms).
CHECK_TIMEOUT_MS = 1000
RULES_FILE = ROOT / "deploy" / "kubernetes" / "monitoring" / "rules.yml"  # generated from prometheus-rule.yaml
SCRAPE_JOB = "threegnet-triton"  # the job the ServiceMonitor gives the replicas in the cluster (its Service's name)
SCRAPE_INTERVAL_S = 2  # the cluster scrapes every 15 s; the rehearsal's tests want to see within seconds (1 s
# timed out on a busy 2-core machine: a replica that answers late read as down)
# Latency quantiles (nv_inference_request_summary_us ...): off by default in Triton 2.51.
METRICS_TRITON_ARGS = ("--metrics-config", "summary_latencies=true")
# The data plane, as HAProxy matches a path (before any decoding: a path with % is refused): server metadata,
# health, and a model's metadata, readiness and inference; "stats" is the statistics API, not a model.
DATA_PLANE_PATH = r"^/v2(/health/(live|ready)|/models/[^/%]+(/versions/[0-9]+)?(/(infer|ready))?)?$"

HAPROXY_CONFIG = """\
global
    maxconn 4096
    noreuseport                 # a port another process listens on is an error, not shared in silence
    tune.bufsize 65536          # a whole request fits in one buffer: needed for L7 retries
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 120s
    # A replica silent this long holds the request no more: it is retried on another (serve/endpoints.py).
    timeout server {server_timeout}s
    timeout check {check_timeout}ms
    timeout http-request 30s
    retries {retries}
    option redispatch 1         # every retry goes to another replica
    # 503: a replica refusing (its queue full) leaves the request to one that may have room; 502: the
    # replica's own front (serve/front.py) lost its Triton mid-request (the empty response behind it).
    retry-on conn-failure empty-response response-timeout 502 503

frontend http
    bind {host}:{http_port}{http_tls}
    # Bodies Triton cannot bound itself (serve/front.py): the same rules as in front of each replica.
{http_body_rules}
    # Only the data plane: the control plane (repository, configs, statistics, ...) stays on the replicas.
    http-request deny deny_status 403 if {{ path -m reg -i ^/v2/models/stats$ }}
    http-request deny deny_status 403 unless {{ path -m reg {data_plane} }}
    default_backend triton_http

frontend grpc
    bind {host}:{grpc_port}{grpc_tls}
{grpc_body_rules}
    http-request deny deny_status 403 unless {{ path {grpc_methods} }}
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
    # A stream of requests may sit idle between them; it is never retried (not buffered whole) either.
    http-request set-timeout server 120s if {{ path /inference.GRPCInferenceService/ModelStreamInfer }}
    option httpchk GET {ready_path}
    http-check expect status 200
    default-server inter {interval}ms fall 1 rise 2
{grpc_servers}
"""


class FleetError(RuntimeError):
    """The fleet could not start (no haproxy, a replica that never got ready...)."""


@dataclass(frozen=True)
class FleetTls:
    """HTTPS and gRPC over TLS at the load balancer (the replicas behind it are on loopback); with
    ``client_ca``, mutual TLS: only clients with a certificate that CA signed get in."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def haproxy_pem(self, work: Path) -> Path:
        for what, path in (("certificate", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise FleetError(f"TLS {what} {path}: no such file")
        return haproxy_pem(self.cert, self.key, work)


@dataclass
class Replica:
    """One ``serve/launch.py`` on its own loopback ports."""

    name: str
    repository: Path
    log_dir: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    supervisor_metrics_port: int = field(default_factory=free_port)  # the launcher's own (its default is shared)
    process: subprocess.Popen | None = None
    starts: int = 0
    triton_args: tuple[str, ...] = ()  # more tritonserver flags, after the launcher's ``--``
    max_request_mb: int = MAX_REQUEST_MB  # its own front's cap: the balancer's

    control_key: str = ""  # the fleet's operators' key, handed over in the environment (never on a command line)

    @property
    def pins(self) -> Path:
        """This replica's version pins (``serve/launch.py --version-pins``): what makes it a canary."""
        return self.log_dir / f"{self.name}.pins"

    def start(self) -> None:
        cmd = [sys.executable, str(ROOT / "serve" / "launch.py"), "--model-repository", str(self.repository),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--supervisor-metrics-port", str(self.supervisor_metrics_port),
               "--exit-timeout", "10", "--version-pins", str(self.pins),
               "--max-request-mb", str(self.max_request_mb)]  # fmt: skip
        if self.triton_args:
            cmd += ["--", *self.triton_args]
        self.starts += 1
        with (self.log_dir / f"{self.name}.log").open("a") as log:
            log.write(f"[fleet] start {self.starts} of replica {self.name}\n")
            log.flush()
            env = {**os.environ, CONTROL_KEY_ENV: self.control_key}
            env.pop("THREEGNET_CONTROL_KEY_FILE", None)  # the fleet's key, whatever the caller's environment says
            self.process = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)

    def wait_ready(self, timeout: float = 180) -> None:
        assert self.process is not None, "start() first"
        try:
            wait_http_ok(f"http://127.0.0.1:{self.http_port}{READY_PATH}", self.process, timeout, poll=0.25)
        except NotAnswering as e:
            log = (self.log_dir / f"{self.name}.log").read_text()[-2000:]
            raise FleetError(f"replica {self.name} did not get ready ({e}):\n{log}") from None

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

    def __init__(
        self,
        repository: Path,
        replicas: int = 2,
        host: str = "127.0.0.1",
        restart: bool = True,
        control_key: str | None = None,
        tls: FleetTls | None = None,
        prometheus: bool = False,
        alert_for: str | None = None,
        max_request_mb: int = MAX_REQUEST_MB,
    ) -> None:
        """``prometheus``: run Prometheus beside the fleet (``prometheus_url``); ``alert_for``: replace every
        alert's ``for:`` with this duration (``"2s"``) so that tests see alerts fire within seconds."""
        if shutil.which("haproxy") is None:
            raise FleetError("no haproxy on PATH: install Debian's haproxy (make haproxy)")
        if prometheus and shutil.which("prometheus") is None:
            raise FleetError("no prometheus on PATH: install Debian's prometheus (make prometheus)")
        self.repository, self.host, self.restart = Path(repository), host, restart
        self.control_key = control_key if control_key is not None else resolve_key()[0]
        self.tls = tls
        if not 0 < max_request_mb <= MAX_REQUEST_MB_LIMIT:
            raise FleetError(f"max_request_mb {max_request_mb}: from 1 to {MAX_REQUEST_MB_LIMIT}")
        self.max_request_mb = max_request_mb
        self._work = tempfile.TemporaryDirectory(prefix="threegnet-fleet-")
        self.work = Path(self._work.name)
        ports = iter(free_ports(4 * replicas + 4))  # all different (a port shared by two listeners is silent)
        self.replicas = [
            Replica(f"r{i}", self.repository, self.work, *(next(ports) for _ in range(4)), control_key=self.control_key,
                    triton_args=METRICS_TRITON_ARGS if prometheus else (), max_request_mb=max_request_mb)
            for i in range(replicas)
        ]  # fmt: skip
        self.prometheus, self.alert_for = prometheus, alert_for
        self.prometheus_port = next(ports) if prometheus else None
        self.prometheus_process: subprocess.Popen | None = None
        self.http_port, self.grpc_port, self.stats_port = next(ports), next(ports), next(ports)
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
                # Readiness from the launcher's own port (serve/readiness.py), over HTTP/1.1 for gRPC too.
                check = f" check port {r.supervisor_metrics_port}"
                extra = f" proto h2{check} check-proto h1" if h2 else check
                lines.append(f"    server {r.name} 127.0.0.1:{getattr(r, port)}{extra}")
            return "\n".join(lines)

        http_tls, grpc_tls = "", " proto h2"
        if self.tls is not None:
            pem = self.tls.haproxy_pem(self.work)
            http_tls = tls_bind(pem, self.tls.client_ca, "http/1.1")
            grpc_tls = tls_bind(pem, self.tls.client_ca, "h2")
        methods = " ".join(f"/inference.GRPCInferenceService/{m}" for m in DATA_PLANE_GRPC_METHODS)
        return HAPROXY_CONFIG.format(
            socket=self.socket, host=self.host, http_port=self.http_port, grpc_port=self.grpc_port,
            stats_port=self.stats_port, ready_path=READY_PATH, interval=CHECK_INTERVAL_MS,
            server_timeout=UPSTREAM_TIMEOUT_S, check_timeout=CHECK_TIMEOUT_MS, retries=UPSTREAM_ATTEMPTS - 1,
            http_servers=servers("http_port", False), grpc_servers=servers("grpc_port", True),
            http_tls=http_tls, grpc_tls=grpc_tls, data_plane=DATA_PLANE_PATH, grpc_methods=methods,
            http_body_rules=HTTP_BODY_RULES.format(max_body=self.max_request_mb * MIB),
            grpc_body_rules=grpc_body_rules(self.max_request_mb, self.work),
        )  # fmt: skip

    @property
    def prometheus_url(self) -> str | None:
        """Prometheus' web UI and API (``/api/v1/query``, ``/api/v1/alerts``), when it runs."""
        return f"http://127.0.0.1:{self.prometheus_port}" if self.prometheus_port else None

    def prometheus_config(self) -> str:
        """Scrape every replica's two metrics ports as the cluster's ServiceMonitor does (one job, an
        ``endpoint`` label naming the Service's port: Triton's ``metrics``, the launcher's
        ``supervisor``), labelled with the replica's name; load the fleet's alert rules."""
        targets = [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"replica": r.name, "endpoint": endpoint}}
            for r in self.replicas
            for endpoint, port in (("metrics", r.metrics_port), ("supervisor", r.supervisor_metrics_port))
        ]
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                       "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "rule_files": [str(self.work / "rules.yml")],
            "scrape_configs": [{"job_name": SCRAPE_JOB, "metrics_path": METRICS_PATH, "static_configs": targets}],
        }  # fmt: skip
        return json.dumps(config, indent=2)  # YAML is a superset of JSON

    def alert_rules(self) -> str:
        """The fleet's rules file, with every ``for:`` replaced by ``alert_for`` when given."""
        rules = RULES_FILE.read_text()
        if self.alert_for is not None:
            rules = re.sub(r"^(\s*)for: .*$", rf"\g<1>for: {self.alert_for}", rules, flags=re.M)
        return rules

    def _start_prometheus(self) -> None:
        config, rules = self.work / "prometheus.yml", self.work / "rules.yml"
        config.write_text(self.prometheus_config())
        rules.write_text(self.alert_rules())
        if shutil.which("promtool") is not None:
            check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
            if check.returncode != 0:
                raise FleetError(f"promtool rejected the configuration:\n{check.stdout}{check.stderr}")
        cmd = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.work / 'prometheus'}",
               f"--web.listen-address=127.0.0.1:{self.prometheus_port}", "--log.level=warn"]  # fmt: skip
        with (self.work / "prometheus.log").open("w") as log:
            self.prometheus_process = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_http_ok(f"{self.prometheus_url}/-/ready", self.prometheus_process, 30, poll=0.2)
        except NotAnswering as e:
            log = (self.work / "prometheus.log").read_text()[-2000:]
            raise FleetError(f"prometheus did not come up ({e}):\n{log}") from None

    @property
    def control_headers(self) -> dict[str, str]:
        """The operators' key as an HTTP header, for a replica's own port (HAProxy forwards no control plane)."""
        return http_headers(self.control_key)

    @property
    def grpc_control_headers(self) -> dict[str, str]:
        return grpc_headers(self.control_key)

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
        if self.prometheus:
            self._start_prometheus()
        self._watcher.start()
        self.description.write_text(json.dumps(self.describe(), indent=1))
        return self

    @property
    def description(self) -> Path:
        """Where a running fleet describes itself for ``deploy/canary.py --fleet`` (no key in it)."""
        return self.work / "fleet.json"

    def describe(self) -> dict:
        """The repository, HAProxy's runtime API and each replica's ports and pins file."""
        return {
            "repository": str(self.repository.resolve()),
            "haproxy_socket": str(self.socket),
            "backends": ["triton_http", "triton_grpc"],
            "replicas": [{"name": r.name, "http_port": r.http_port, "metrics_port": r.metrics_port,
                          "pins": str(r.pins)} for r in self.replicas],
        }  # fmt: skip

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

    @contextlib.contextmanager
    def held(self, name: str) -> Iterator[None]:
        """The watcher leaves replica ``name`` alone meanwhile: a replica that exits stays down (what a
        crash-looping pod's back-off looks like), until the block ends and the watcher restarts it."""
        self._held.add(name)
        try:
            yield
        finally:
            self._held.discard(name)

    def rolling_restart(self, wait_up: float = 180, attempts: int = 2) -> None:
        """Restart the replicas one by one: drain in HAProxy, wait for its sessions to end, stop,
        start, wait until HAProxy has it UP again, then the next. A start that does not get ready is
        killed and tried again (a liveness probe's job), ``attempts`` times in all; whatever happens,
        the replica goes back under HAProxy's health checks rather than staying drained."""
        for r in self.replicas:
            self._held.add(r.name)
            try:
                for backend in ("triton_http", "triton_grpc"):
                    self.admin(f"set server {backend}/{r.name} state drain")
                time.sleep(2 * CHECK_INTERVAL_MS / 1000)  # let requests already sent to it finish
                for attempt in range(1, attempts + 1):
                    r.stop()
                    r.start()
                    try:
                        r.wait_ready()
                        break
                    except FleetError as e:
                        print(f"[fleet] {e}", file=sys.stderr)
                        if attempt == attempts:
                            r.stop(grace=5)  # the watcher starts it again
                            raise
                for backend in ("triton_http", "triton_grpc"):
                    self.admin(f"set server {backend}/{r.name} state ready")
                deadline = time.monotonic() + wait_up
                while self.replica_state(r.name) != {"UP"}:
                    if time.monotonic() > deadline:
                        raise FleetError(f"replica {r.name} did not rejoin: {self.states()}")
                    time.sleep(0.2)
            finally:
                for backend in ("triton_http", "triton_grpc"):
                    with contextlib.suppress(OSError):
                        self.admin(f"set server {backend}/{r.name} state ready")
                self._held.discard(r.name)

    def stop(self) -> None:
        self._halt.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        if self.prometheus_process is not None:
            stop(self.prometheus_process, 5)
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
    p.add_argument("--control-key-file", type=Path, help="the operators' key (default: as serve/launch.py reads it)")
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS and gRPC over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="mutual TLS: only clients whose certificate this CA signed")
    p.add_argument(
        "--max-request-mb",
        type=int,
        default=MAX_REQUEST_MB,
        help=f"the largest request body forwarded, here and by each replica's front (default {MAX_REQUEST_MB})",
    )
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="run Prometheus beside the fleet, scraping the replicas and evaluating the alerts (make prometheus)",
    )
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        p.error("TLS needs both --tls-cert and --tls-key (and them for --tls-client-ca)")
    try:
        key, origin = resolve_key(args.control_key_file)
    except ControlKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tls = FleetTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    raise_on_stop_signals()
    try:
        fleet = Fleet(args.model_repository, args.replicas, control_key=key, tls=tls, prometheus=args.prometheus,
                      max_request_mb=args.max_request_mb)  # fmt: skip
        with fleet:
            scheme = "https" if tls else "http"
            url = fleet.prometheus_url
            monitoring = f"  Prometheus  {url}  (alerts: {url}/alerts)\n" if url else ""
            print(
                f"fleet of {args.replicas} replicas behind HAProxy:\n"
                f"  {scheme.upper():5}  {scheme}://{fleet.http_url}\n  gRPC   {fleet.grpc_url}"
                f"{' (TLS)' if tls else ''}\n  stats  http://{fleet.host}:{fleet.stats_port}/\n{monitoring}"
                f"  canary python deploy/canary.py --fleet {fleet.work} watch --version N  (docs/deploy.md)\n"
                f"Only the data plane passes the load balancer; the replicas' control plane wants the operators' "
                f"key ({origin}).\nCtrl-C to stop.",
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
