"""Self-healing: reloading a python-backend model whose stub process died.

A python-backend model runs in stub processes (children of ``tritonserver``). When one dies
(SIGKILL, segfault, the OOM killer), Triton 2.51 neither restarts it nor stops calling the model
ready (docs/operations.md). The supervisor looks every ``HEAL_TICK`` seconds, so it sees the stub
vanish within that time, unloads the model (from then on the model's and, through the ensemble
that needs it, the server's readiness are not 200, and requests fail at once with "unknown
model") and loads it again.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tritonclient.utils import InferenceServerException

from serve.triton_api import TritonAPI

HEAL_TICK = 0.25  # seconds between looks at the backend processes
STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class BackendProcess:
    pid: int
    model: str
    instance: str


def backend_processes(server_pid: int) -> list[BackendProcess]:
    """The live python-backend stub processes of the Triton server ``server_pid``, from /proc.

    A stub's command line is ``STUB <repo>/<model>/<version>/model.py <shm> ... <instance> ...``.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != server_pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if fields[0] not in "ZX" and args and args[0].endswith(STUB) and len(args) > 1:  # Z: dead, not reaped
            instance = args[8] if len(args) > 8 else ""
            found.append(BackendProcess(int(entry), Path(args[1]).parent.parent.name, instance))
    return found


class Healer:
    """Watches the server's stub processes and reloads a model that lost one to a crash."""

    def __init__(
        self,
        api: TritonAPI,
        server_pid: int,
        load: Callable[[str], str | None],  # loads a model as it serves (its verified versions)
        stopping: threading.Event,
        log: Callable[[str], None],
    ) -> None:
        self.api, self.server_pid, self.load, self.stopping, self.log = api, server_pid, load, stopping, log
        self._known: dict[int, str] = {}  # live stub pid -> model
        self.heals = 0  # how many reloads healed a model (tests and logs read it)
        # (model, unloaded, serving again): time.monotonic() of each healed outage; between the
        # two, Triton's readiness for the model (and the server's) is not 200.
        self.outages: list[tuple[str, float, float]] = []

    def start(self) -> None:
        """Take the stub processes running now as the ones to watch."""
        self._known = {p.pid: p.model for p in backend_processes(self.server_pid)}

    def check(self) -> None:
        """Heal each model that lost a stub process since the last look."""
        now = {p.pid: p.model for p in backend_processes(self.server_pid)}
        gone = {pid: model for pid, model in self._known.items() if pid not in now}
        self._known = now
        alive = Counter(now.values())
        for model in sorted(set(gone.values())):
            if self.stopping.is_set():
                return
            expected = self._expected_processes(model)
            if alive[model] >= expected:
                continue  # an unload or a rollout ended those processes, not a crash
            pids = ", ".join(str(pid) for pid, m in gone.items() if m == model)
            self.log(f"[supervisor] {model}: backend process {pids} died; reloading the model")
            self._reload(model)
        if gone:
            self._known = {p.pid: p.model for p in backend_processes(self.server_pid)}

    def _expected_processes(self, model: str) -> int:
        """Stub processes a READY python model should have: ready versions x instances."""
        ready = len(self.api.ready_versions(model))
        if not ready:
            return 0
        try:
            config = self.api.client.get_model_config(model, headers=self.api.headers)
        except InferenceServerException:
            return 0
        if config.get("backend") != "python":
            return 0
        return ready * sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or ready

    def _reload(self, model: str) -> None:
        """Unload (so nothing calls the model ready while it cannot answer), then load, with
        backoff while the load fails."""
        started, delay = time.monotonic(), 1.0
        self.api.unload(model)
        unloaded = time.monotonic()
        while not self.stopping.is_set():
            error = self.load(model)
            if error is None:
                self.outages.append((model, unloaded, time.monotonic()))
                self.heals += 1
                self.log(f"[supervisor] {model}: serving again, {time.monotonic() - started:.1f} s after the crash")
                return
            self.log(f"[supervisor] {model}: reload failed ({error}); trying again in {delay:.0f} s")
            self.stopping.wait(delay)
            delay = min(2 * delay, 30.0)
