"""Every way a process manager, a shell or a person stops us, done to the real entry points:
SIGTERM, SIGINT sent to the pid (not a terminal's Ctrl-C to the group), SIGHUP, and SIGKILL of the
parent. Afterwards no process it started is alive and every port it held is free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, alive, descendants, start, wait_for_line

from serve.server import free_port, port_in_use

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


def stop_and_check(proc: subprocess.Popen, sig: int, ports: list[int], log: Path, expect_children: int) -> None:
    children = descendants(proc.pid)
    assert len(children) >= expect_children, children
    try:
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 20  # the bound for everything to be gone
        while any(alive(p) for p in children) or any(port_in_use("127.0.0.1", p) for p in ports):
            if time.monotonic() > deadline:
                left = [(p, Path(f"/proc/{p}/cmdline").read_bytes()[:80]) for p in children if alive(p)]
                busy = [p for p in ports if port_in_use("127.0.0.1", p)]
                pytest.fail(
                    f"left after {signal.Signals(sig).name}: {left}; ports busy: {busy}\n{log.read_text()[-2000:]}"
                )
            time.sleep(0.2)
    finally:
        for p in [proc.pid, *children]:
            if alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_the_launcher_stops_everything_on(sig, model_repository, tmp_path):
    ports = [free_port(), free_port(), free_port()]
    log = tmp_path / "launch.log"
    proc = start([sys.executable, str(ROOT / "serve" / "launch.py"), "--model-repository", str(model_repository),
                  "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                  "--supervisor-metrics-port", str(free_port()), "--exit-timeout", "5"], log)  # fmt: skip
    wait_for_line(proc, log, "Ctrl-C to stop.")
    stop_and_check(proc, sig, ports, log, expect_children=4)  # tritonserver and its three stubs
    assert proc.returncode == 0 and "Triton stopped." in log.read_text(), log.read_text()[-2000:]


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Data, a trained tiny model and its export, made once by the headless pipeline."""
    base = tmp_path_factory.mktemp("demo")
    dirs = ["--data-dir", str(base / "data"), "--run-dir", str(base / "runs"),
            "--model-repository", str(base / "model_repository")]  # fmt: skip
    ports = [str(free_port()) for _ in range(3)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "run_all.py"), "--headless", "--tiny", *dirs,
         "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("sig", [*SIGNALS, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_the_demo_pipeline_stops_everything_on(sig, demo_dirs, tmp_path):
    """pipeline/run_all.py with Triton and Gradio up. SIGKILL gives it no chance to clean up: its
    children must notice by themselves (PR_SET_PDEATHSIG) and stop, freeing their ports."""
    ports = [free_port() for _ in range(4)]
    log = tmp_path / "demo.log"
    proc = start([sys.executable, str(ROOT / "pipeline" / "run_all.py"), "--tiny", *demo_dirs,
                  "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                  "--demo-port", str(ports[3])], log)  # fmt: skip
    wait_for_line(proc, log, "[demo] ready in")
    stop_and_check(proc, sig, ports, log, expect_children=6)  # launcher, tritonserver, 3 stubs, Gradio
    text = log.read_text()
    assert "Triton stopped." in text, text[-2000:]  # the server was stopped gracefully, not killed
    if sig != signal.SIGKILL:
        assert "[demo] stopped" in text and f"stopped by {signal.Signals(sig).name}" in text, text[-2000:]
        assert proc.returncode == (0 if sig == signal.SIGINT else 128 + sig)
