"""HAProxy in front of one Triton server: the request bodies Triton 2.51 cannot bound are refused
before Triton reads a byte of them (docs/security.md#the-caps-in-front-of-triton).

Triton 2.51 has no body-size flag: a 2 GiB body aborts it, and it inflates ``Content-Encoding``
bodies itself and keeps the memory. So the launcher binds Triton's HTTP and gRPC ports on loopback
ports of its own and puts Debian's ``haproxy`` on the ports clients use, with the rules below (the
fleet's load balancer, ``deploy/local_fleet.py``, applies the same ones). Metrics and the launcher's
own port are not behind it: they read no request body.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from serve.children import spawn

MIB = 1024 * 1024
FRONT_HOST = "127.0.0.1"  # where Triton listens when the front is in front of it

# What Triton cannot bound itself, refused on the request's headers (HAProxy configuration lines, for a
# `frontend` in `mode http`; `{max_body}` in bytes): compressed bodies (Triton inflates them), bigger ones,
# and POSTs whose size is not announced (chunked: nothing to check). HAProxy's integers are 32 bits: a
# length of 2^32 + 100 reads as 100, so a length of ten digits or more is refused before it is compared.
HTTP_BODY_RULES = """\
    acl coded req.hdr(content-encoding) -m found
    acl plain req.hdr(content-encoding) -i identity
    acl sized req.hdr(content-length) -m found
    acl ten_digits req.hdr(content-length) -m reg ^[0-9]{{10,}}$
    http-request return status 415 content-type text/plain string "compressed bodies refused" if coded !plain
    http-request deny deny_status 413 if ten_digits || {{ req.hdr_val(content-length) gt {max_body} }}
    http-request return status 411 content-type text/plain string "Content-Length needed" if METH_POST !sized"""
MAX_REQUEST_MB_LIMIT = (10**9 - 1) // MIB  # 953: the largest cap whose lengths have nine digits
# gRPC messages: HAProxy cannot count an HTTP/2 stream's bytes, but every message starts with a 5-byte prefix,
# a compressed flag and its length (4 bytes, big-endian): the first message of an inference call is held until
# that prefix is in, and refused if it announces more than `{max_message_hex}` (8 hex digits, so that comparing
# the strings compares the numbers). The answer is a gRPC one, from a file (`{work}`: HAProxy sends a reply's
# content type only with a body, and a gRPC error has none). A call that sends no prefix within 10 s is answered
# 408; of a stream, only the first message is read.
GRPC_BODY_RULES = """\
    acl coded req.hdr(grpc-encoding) -m found
    acl plain req.hdr(grpc-encoding) -i identity
    acl infer path /inference.GRPCInferenceService/ModelInfer /inference.GRPCInferenceService/ModelStreamInfer
    acl too_large req.body,bytes(1,4),hex,strcmp(txn.max_message) gt 0
    http-request return status 415 content-type text/plain string "compressed messages refused" if coded !plain
    http-request wait-for-body time 10s at-least 5 if infer
    http-request set-var(txn.max_message) str({max_message_hex}) if infer
    http-request return errorfile {work}/grpc-too-large.http if infer too_large"""
GRPC_ERROR = "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: {code}\r\ngrpc-message: {message}\r\n" \
    "content-length: 0\r\n\r\n"  # fmt: skip


def grpc_body_rules(max_request_mb: int, work: Path) -> str:
    """:data:`GRPC_BODY_RULES` for a cap of ``max_request_mb``, with their answers written into ``work``."""
    message = f"message larger than {max_request_mb} MiB refused"
    (work / "grpc-too-large.http").write_text(GRPC_ERROR.format(code=8, message=message))  # RESOURCE_EXHAUSTED
    return GRPC_BODY_RULES.format(max_message_hex=f"{max_request_mb * MIB:08X}", work=work)


CONFIG = """\
global
    maxconn 4096
    nbthread 2
    # A port another process listens on is an error, not shared in silence (HAProxy sets SO_REUSEPORT).
    noreuseport
    # Camera photos over gRPC: 64 KiB buffers, an 8 MiB window and 1 MiB frames (HAProxy's defaults, 16 KiB and
    # 64 KiB, cost a fifth of the throughput of 2.6 MB uploads: docs/performance.md#the-fronts-cost).
    tune.bufsize 65536
    tune.h2.initial-window-size 8388608
    tune.h2.max-frame-size 1048576
defaults
    mode http
    timeout connect 2s
    # Triton itself waits for nobody: the client's timeout, or the balancer's in front, decides.
    timeout client 1h
    timeout server 1h
    timeout http-request 30s
    # One Triton behind it: a refused connection is answered 503 at once, never retried here.
    retries 0

frontend http
    bind {http_bind}
{http_rules}
    default_backend triton_http

frontend grpc
    bind {grpc_bind}
{grpc_rules}
    default_backend triton_grpc

backend triton_http
    # No idle connection left open to Triton: a stopping Triton waits out its exit timeout for every one.
    option http-server-close
    server triton {triton}:{triton_http_port}

backend triton_grpc
    server triton {triton}:{triton_grpc_port} proto h2
"""


class FrontError(RuntimeError):
    """The front could not start (no haproxy, a configuration HAProxy refuses, a port it cannot bind)."""


def haproxy_pem(cert: Path, key: Path, work: Path) -> Path:
    """HAProxy wants a certificate and its key in one file (readable by us alone)."""
    pem = work / "tls.pem"
    pem.touch(mode=0o600)
    pem.write_text(Path(cert).read_text() + Path(key).read_text())
    return pem


def tls_bind(pem: Path, client_ca: Path | None, alpn: str) -> str:
    """The ``bind`` options that serve TLS with ``pem`` (mutual TLS with ``client_ca``)."""
    verify = f" ca-file {client_ca} verify required" if client_ca else ""
    return f" ssl crt {pem}{verify} alpn {alpn}"


def bind_address(host: str, port: int) -> str:
    """``host:port`` as HAProxy's ``bind`` takes it (an IPv6 address with its ``ipv6@`` prefix)."""
    return f"ipv6@{host}:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Front:
    """HAProxy on ``host``'s ``http_port`` and ``grpc_port``, forwarding to a Triton on loopback.

    ``max_request_mb``: the largest HTTP body forwarded; ``tls``: (pem, client CA or None) for gRPC
    over TLS, which the front then terminates."""

    host: str
    http_port: int
    grpc_port: int
    triton_http_port: int
    triton_grpc_port: int
    max_request_mb: int
    work: Path
    grpc_tls: tuple[Path, Path | None] | None = None
    process: subprocess.Popen | None = None

    def config(self) -> str:
        grpc_bind = bind_address(self.host, self.grpc_port)
        grpc_bind += tls_bind(*self.grpc_tls, "h2") if self.grpc_tls else " proto h2"
        return CONFIG.format(
            http_bind=bind_address(self.host, self.http_port) + " proto h1",  # Triton's HTTP is HTTP/1.1 only
            grpc_bind=grpc_bind,
            http_rules=HTTP_BODY_RULES.format(max_body=self.max_request_mb * MIB),
            grpc_rules=grpc_body_rules(self.max_request_mb, self.work),
            triton=FRONT_HOST,
            triton_http_port=self.triton_http_port,
            triton_grpc_port=self.triton_grpc_port,
        )

    def start(self, timeout: float = 10.0) -> Front:
        """Start HAProxy and wait until both ports accept connections."""
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise FrontError("no haproxy on PATH")
        path, log = self.work / "front.cfg", self.work / "front.log"
        path.write_text(self.config())
        with log.open("w") as out:
            self.process = spawn([haproxy, "-db", "-f", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(_accepts(self.host, p) for p in (self.http_port, self.grpc_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                lines = [ln for ln in log.read_text().splitlines() if ln.strip()][-5:]
                raise FrontError("haproxy did not start: " + (" / ".join(lines) or "no output"))
            time.sleep(0.05)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop HAProxy (it closes every connection it holds)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _accepts(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((target, port)) == 0
