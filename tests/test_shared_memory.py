"""The python backend's shared-memory regions (/dev/shm, one per stub) are the launcher's to clean up:
a tritonserver killed with SIGKILL leaves them behind for good, so each run names its own
(``serve/server.py``, ``ShmRegions``), removes them once Triton has exited however it exited,
and a later start removes the runs whose lock no process holds any more, never a running server's."""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, alive, descendants, good_png, infer, start, wait_for_line

from serve.server import SHM_DIR, SHM_PREFIX, ShmRegions, TritonServer, free_port, remove_stale_regions


def regions(prefix: str, directory: Path = SHM_DIR) -> set[str]:
    """The files of a run (its lock included)."""
    return {name for name in os.listdir(directory) if name.startswith(prefix)}


def fake_run(directory: Path) -> ShmRegions:
    """A run's lock, as a launcher makes it, and two regions as Triton names them."""
    run = ShmRegions(directory)
    for n in range(2):
        (directory / f"{run.prefix}{secrets.token_hex(8)}").write_bytes(bytes(4096 * (n + 1)))
    return run


def test_only_runs_whose_lock_nobody_holds_are_removed(tmp_path: Path):
    """The rule, on runs made as the launcher makes them: a run is over, and its files removed, once no
    process holds its lock: not while its owner runs, nor while a child that inherited the lock does (a
    tritonserver draining after its launcher died). Other users' runs, regions without a lock, a lock
    that is not a regular file, and Triton's default names are never touched."""
    running, draining, over, theirs = (fake_run(tmp_path) for _ in range(4))
    assert over.fd is not None and draining.fd is not None and theirs.fd is not None
    child = subprocess.Popen(["sleep", "120"], pass_fds=(draining.fd,))
    for run in (draining, over, theirs):  # their owners are gone
        os.close(run.fd)
        run.fd = None
    if os.getuid() == 0:
        for name in regions(theirs.prefix, tmp_path):
            os.chown(tmp_path / name, 54321, 54321)
    else:  # only root can make another user's files: here their run is still locked instead
        theirs.fd = os.open(tmp_path / f"{theirs.prefix}lock", os.O_RDONLY)
        fcntl.flock(theirs.fd, fcntl.LOCK_EX)
    untouchable = {
        f"{SHM_PREFIX}{os.getpid()}_0a1b2c3d_uuid",  # a region without a lock: nothing proves its run is over
        "triton_python_backend_shm_region_0a1b2c3d-uuid",  # Triton's default name: any server's
    }
    for name in untouchable:
        (tmp_path / name).write_bytes(bytes(4096))
    (tmp_path / f"{SHM_PREFIX}1_00000000_lock").mkdir()
    (tmp_path / f"{SHM_PREFIX}1_00000000_region").write_bytes(bytes(4096))
    (tmp_path / f"{SHM_PREFIX}2_00000000_lock").symlink_to(tmp_path / f"{SHM_PREFIX}1_00000000_region")
    try:
        assert remove_stale_regions(tmp_path) == (2, 3 * 4096)
        assert not regions(over.prefix, tmp_path)
        for run in (running, draining, theirs):
            assert len(regions(run.prefix, tmp_path)) == 3, run.prefix
    finally:
        child.kill()
        child.wait()
    assert remove_stale_regions(tmp_path) == (2, 3 * 4096)  # the child that held it is gone
    assert not regions(draining.prefix, tmp_path)
    running.remove()
    assert not regions(running.prefix, tmp_path)
    assert all((tmp_path / name).exists() for name in untouchable)
    assert len(regions(theirs.prefix, tmp_path)) == 3
    if theirs.fd is not None:
        os.close(theirs.fd)


@pytest.fixture(scope="module")
def neighbour(model_repository: Path):
    """A server that keeps running beside the ones killed here: its regions must never be touched."""
    with TritonServer.on_free_ports(model_repository, exit_timeout=3) as server:
        yield server


def launcher_regions(pid: int) -> set[str]:
    return regions(f"{SHM_PREFIX}{pid}_")


def tritonserver_of(launcher: int) -> int:
    for pid in descendants(launcher):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
                return pid
        except OSError:
            continue
    raise AssertionError(f"no tritonserver under the launcher {launcher}")


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["tritonserver", "launcher", "launcher and tritonserver"])
def test_what_a_killed_server_leaves_in_dev_shm_is_removed(killed, neighbour, model_repository, tmp_path):
    """SIGKILL to the launcher's tritonserver: the launcher removes its regions as it exits. SIGKILL to
    the launcher (its tritonserver then drains and exits by itself), or to both at once (the OOM killer,
    a cgroup kill): nothing is left once the next server has started. The neighbour's regions are
    untouched throughout and it keeps answering."""
    theirs = regions(neighbour.shm_prefix)
    assert theirs, "the neighbour's regions carry its prefix"
    log = tmp_path / "launch.log"
    ports = [f"--{name}-port={free_port()}" for name in ("http", "grpc", "metrics")]
    launch = [sys.executable, str(ROOT / "serve" / "launch.py"), "--model-repository", str(model_repository)]
    proc = start([*launch, *ports, "--supervisor-metrics-port=0", "--exit-timeout=3"], log)
    children = set()
    try:
        wait_for_line(proc, log, "Ctrl-C to stop.")
        children = descendants(proc.pid)
        ours = launcher_regions(proc.pid)
        assert len(ours) >= 3, ours  # a stub per python-backend instance: preprocessing, stand-in, ...
        server = tritonserver_of(proc.pid)
        if killed != "tritonserver":
            os.kill(proc.pid, signal.SIGKILL)
        if killed != "launcher":
            os.killpg(server, signal.SIGKILL)  # tritonserver and its stubs: nobody unlinks anything
            time.sleep(0.2)
            assert launcher_regions(proc.pid) or killed == "tritonserver", "SIGKILL left nothing: nothing to show"
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in children):
            assert time.monotonic() < deadline, [p for p in children if alive(p)]
            time.sleep(0.2)
    finally:
        for p in [proc.pid, *children]:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    if killed == "tritonserver":
        assert proc.returncode != 0 and "exited on its own" in log.read_text(), log.read_text()[-2000:]
    else:
        following = TritonServer.on_free_ports(model_repository, exit_timeout=3)
        try:
            following.start()  # the sweep comes before Triton is started
        finally:
            following.stop()
        assert not regions(following.shm_prefix)
    assert launcher_regions(proc.pid) == set(), "left behind"
    assert regions(neighbour.shm_prefix) == theirs
    assert infer(neighbour, good_png())[0] == 200 and neighbour.is_ready()


@pytest.mark.slow
def test_a_stopped_server_leaves_nothing(neighbour):
    """A graceful stop: Triton unlinks its regions itself, and the launcher finds nothing left to remove."""
    prefix = neighbour.shm_prefix
    assert regions(prefix)
    neighbour.stop()
    assert regions(prefix) == set()


@pytest.mark.slow
def test_a_prefix_given_to_triton_is_left_alone(model_repository: Path):
    """``--backend-config=python,shm-region-prefix-name=...`` after ``--`` is the caller's: not replaced
    (their tools find their regions) and not removed by us, even after a SIGKILL."""
    prefix = f"theirs_{secrets.token_hex(4)}_"
    server = TritonServer.on_free_ports(
        model_repository, exit_timeout=3, extra_args=[f"--backend-config=python,shm-region-prefix-name={prefix}"]
    )
    try:
        server.start().wait_ready()
        assert server.shm_prefix is None and regions(prefix)
        os.killpg(server.process.pid, signal.SIGKILL)
    finally:
        server.stop()
    try:
        assert regions(prefix), "removed although the caller named them"
    finally:
        for name in regions(prefix):
            (SHM_DIR / name).unlink()
