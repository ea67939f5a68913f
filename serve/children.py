"""Child processes that never outlive their owner, and stop signals that always stop it.

Every entry point that starts processes (``pipeline/run_all.py``, ``serve/launch.py``, the
benchmarks) owns them: SIGINT sent to its own pid, SIGTERM and SIGHUP all mean "stop
everything and exit", even when the shell started it with SIGINT ignored (a background
job); a child gets SIGTERM from the kernel when its owner dies, even by SIGKILL
(``PR_SET_PDEATHSIG``), so no child holds a port after its parent is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _libc_prctl()  # resolved here, not in the forked child: no dlopen between fork and exec


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the parent dies (Linux). Only for a parent with
    one thread: Python code between fork and exec can deadlock or crash the child of a threaded
    one (https://docs.python.org/3/library/subprocess.html#subprocess.Popen, ``preexec_fn``)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Stopped(Exception):
    """Raised in the main thread by a stop signal (see :func:`raise_on_stop_signals`)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def raise_on_stop_signals() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Stopped` in the main thread, once:
    ``finally`` blocks and context managers then stop what was started. Later signals
    are ignored while stopping (the cleanup has its own time limits)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)


def on_stop_signals(callback: Callable[[int], None]) -> None:
    """Call ``callback(signum)`` on SIGINT, SIGTERM and SIGHUP (also when SIGINT was ignored)."""
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, _frame: callback(signum))


def spawn(cmd: Sequence[str], new_session: bool = False, **kwargs: object) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (a terminal's Ctrl-C reaches only the owner,
    which then stops it deliberately), or its own session, dying with its parent.

    util-linux's ``setpriv --pdeathsig`` sets the parent-death signal and execs ``cmd`` (same pid),
    so nothing of ours runs between fork and exec, whatever threads the owner has (gRPC clients,
    watchers); without setpriv, :func:`die_with_parent` does it.
    """
    group: dict[str, object] = {"start_new_session": True} if new_session else {"process_group": 0}
    if setpriv := shutil.which("setpriv"):
        return subprocess.Popen([setpriv, "--pdeathsig", "TERM", "--", *cmd], **group, **kwargs)  # type: ignore[call-overload]
    return subprocess.Popen(list(cmd), preexec_fn=die_with_parent, **group, **kwargs)  # type: ignore[call-overload]


def stop(proc: subprocess.Popen, grace: float, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` (graceful) to a running child, wait up to ``grace`` seconds, then SIGKILL
    its whole process group."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def wait_any(procs: Sequence[subprocess.Popen], poll: float = 0.5) -> subprocess.Popen:
    """Block until one of ``procs`` exits; return it."""
    while True:
        for proc in procs:
            if proc.poll() is not None:
                return proc
        time.sleep(poll)


class NotAnswering(RuntimeError):
    """A child process exited, or did not answer HTTP 200 in time (see :func:`wait_http_ok`)."""


def wait_http_ok(url: str, proc: subprocess.Popen, timeout: float, poll: float = 0.5) -> None:
    """Block until ``url`` answers HTTP 200 while ``proc``, which serves it, runs.

    Raises :class:`NotAnswering` saying why ("exited with status N", "not ready after T s (url)").
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NotAnswering(f"exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll)
    raise NotAnswering(f"not ready after {timeout:.0f} s ({url})")
