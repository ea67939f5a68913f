"""What the launcher says when it cannot serve: one ``error:`` line and the documented exit status,
never a traceback or a page of Triton's usage. And IPv6 addresses work, and the request front
(HAProxy, serve/front.py) is where it must be: on the public ports, Triton behind it on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, descendants, start, wait_for_line

from client.inference import TritonClassifier
from serve.server import TritonServer, free_port


def launch(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "serve/launch.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def without_haproxy() -> dict[str, str]:
    """Our environment with no haproxy on PATH (util-linux's setpriv stays)."""
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is needed (make haproxy)"
    path = [d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "haproxy").exists()]
    return {**os.environ, "PATH": os.pathsep.join(path)}


def one_error_line(result: subprocess.CompletedProcess, status: int) -> str:
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Usage:" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def ports() -> list[str]:
    names = ("--http-port", "--grpc-port", "--metrics-port", "--supervisor-metrics-port")
    return [arg for name in names for arg in (name, str(free_port()))]


def test_equal_ports_are_refused_as_bad_arguments(model_repository):
    line = one_error_line(
        launch("--model-repository", str(model_repository), "--http-port", "18123", "--grpc-port", "18123"), 2
    )
    assert "ports must differ" in line and "18123" in line


@pytest.mark.parametrize(
    ("host", "says"),
    [("10.255.255.1", "is not an address of this machine"), ("no-such-host.invalid", "cannot resolve the host")],
)
def test_a_host_that_cannot_be_served_is_named_not_called_a_busy_port(model_repository, host, says):
    line = one_error_line(launch("--model-repository", str(model_repository), "--host", host, *ports()), 1)
    assert says in line and host in line and "in use" not in line


def test_a_garbage_config_is_one_line_naming_the_file(model_repository, tmp_path):
    broken = tmp_path / "repository"
    shutil.copytree(model_repository, broken)
    (broken / "threegnet_classifier" / "config.pbtxt").write_text("this is { not a config\n")
    line = one_error_line(launch("--model-repository", str(broken), *ports()), 1)
    assert "threegnet_classifier/config.pbtxt: not a Triton model config" in line


def test_the_exit_codes_are_in_the_help():
    result = launch("--help")
    assert result.returncode == 0
    for status in ("0 ", "1 ", "2 "):
        assert f"\n  {status}" in result.stdout.split("exit status:")[1]


@pytest.mark.slow
def test_an_ipv6_loopback_is_served_over_both_protocols(model_repository):
    server = TritonServer.on_free_ports(model_repository, host="::1", exit_timeout=3)
    with server:
        assert server.http_url.startswith("[::1]:")
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            health = TritonClassifier(url, protocol).health()
            assert health.live and health.ready, health


def test_serving_other_machines_without_haproxy_is_refused(model_repository):
    """Without the front, one 2 GiB body from any client aborts Triton 2.51: beyond loopback, not served."""
    result = launch("--model-repository", str(model_repository), "--host", "0.0.0.0", *ports(), env=without_haproxy())
    line = one_error_line(result, 1)
    assert "haproxy" in line and "--max-request-mb 0" in line


def test_a_cap_haproxy_cannot_compare_is_a_bad_argument(model_repository):
    line = one_error_line(launch("--model-repository", str(model_repository), "--max-request-mb", "4096"), 2)
    assert "--max-request-mb 4096" in line


@pytest.mark.slow
def test_on_all_interfaces_only_the_front_listens_beyond_loopback(model_repository):
    """Triton's own HTTP and gRPC ports answer on loopback only: a client elsewhere meets the front."""
    with TritonServer.on_free_ports(model_repository, host="0.0.0.0", exit_timeout=3) as server:
        assert server.front is not None and server.front.process is not None
        assert server.triton_http_port != server.http_port and server.triton_grpc_port != server.grpc_port
        outside = non_loopback_address()
        for port in (server.http_port, server.grpc_port):
            with socket.create_connection((outside, port), timeout=5):
                pass
        for port in (server.triton_http_port, server.triton_grpc_port):
            with pytest.raises(ConnectionRefusedError), socket.create_connection((outside, port), timeout=5):
                pass
        health = TritonClassifier(f"{outside}:{server.grpc_port}", "grpc").health()
        assert health.live and health.ready


def non_loopback_address() -> str:
    """An IPv4 address of this machine that is not loopback (where a client on the network connects)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the kernel only picks the source address
        address = s.getsockname()[0]
    assert not address.startswith("127."), address
    return address


@pytest.mark.slow
def test_without_haproxy_a_loopback_server_warns_and_serves_uncapped(model_repository, monkeypatch):
    monkeypatch.setenv("PATH", without_haproxy()["PATH"])
    lines: list[str] = []
    with TritonServer.on_free_ports(model_repository, exit_timeout=3, log=lines.append) as server:
        assert server.front is None and server.triton_http_port == server.http_port
        assert any("no haproxy on PATH: request bodies are not capped" in line for line in lines)
        assert TritonClassifier(server.http_url, "http").health().ready


@pytest.mark.slow
def test_a_front_that_dies_takes_the_launcher_down_with_one_error_line(model_repository, tmp_path):
    """Nobody could reach Triton any more: the launcher stops it and exits 1, so its owner restarts it."""
    log = tmp_path / "launch.log"
    proc = start([sys.executable, str(ROOT / "serve" / "launch.py"), "--model-repository", str(model_repository),
                  *ports(), "--exit-timeout", "3", "--quiet"], log)  # fmt: skip
    try:
        wait_for_line(proc, log, "Ctrl-C to stop.")
        children = descendants(proc.pid)
        fronts = [p for p in children if Path(f"/proc/{p}/comm").read_text().strip() == "haproxy"]
        assert len(fronts) == 1, children
        os.kill(fronts[0], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())
    assert "request front (haproxy) exited" in one_error_line(result, 1)
