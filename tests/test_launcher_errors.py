"""What the launcher says when it cannot serve: one ``error:`` line and the documented exit status,
never a traceback or a page of Triton's usage. And IPv6 addresses work."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

from client.inference import TritonClassifier
from serve.server import TritonServer, free_port


def launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "serve/launch.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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
