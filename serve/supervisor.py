"""Keeping a running Triton's models serving: self-healing and zero-downtime rollouts.

Triton runs with ``--model-control-mode=explicit``; this thread, beside it in the
launcher, uses Triton's own repository API (load, unload, index) through ``tritonclient``,
with the operators' key (serve/control.py):

* **Self-healing.** A python-backend model runs in stub processes (children of
  ``tritonserver``). When one dies (SIGKILL, segfault, the OOM killer), Triton 2.51
  neither restarts it nor stops calling the model ready (docs/operations.md). The supervisor
  sees the stub vanish within ``HEAL_TICK`` seconds, unloads the model (from then on
  the model's and, through the ensemble that needs it, the server's readiness are
  not 200, and requests fail at once with "unknown model") and loads it again.
* **Rollouts.** The model repository is polled every ``poll_secs``: a model folder
  whose files changed (a new version exported, a config rewritten by
  ``serve/versions.py``) and then stayed unchanged for one more poll is loaded again.
  Triton loads the new version beside the old one, which answers until the new one
  is ready: no request fails. Stand-in models get their shadow refreshed first.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serve.standin import model_dirs, refresh_shadow_model

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


def fingerprint(model_dir: Path) -> tuple:
    """What a model folder holds: every file's path, size and modification time."""
    rows = []
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            try:
                st = path.stat()
            except OSError:
                continue
            rows.append((str(path.relative_to(model_dir)), st.st_size, st.st_mtime_ns))
    return tuple(rows)


class Supervisor(threading.Thread):
    """Heals dead backend processes and follows the model repository; see the module doc."""

    def __init__(
        self,
        http_url: str,
        server_pid: int,
        repository: Path | None,  # None: a remote repository, not watched
        shadow: Path | None,
        gpu: bool = False,
        poll_secs: float = 2.0,
        heal: bool = True,
        log: Callable[[str], None] = print,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name="triton-supervisor", daemon=True)
        self.http_url, self.server_pid = http_url, server_pid
        self.headers = headers  # the operators' key: the repository API is locked without it
        self._client: httpclient.InferenceServerClient | None = None
        self.repository, self.shadow, self.gpu = repository, shadow, gpu
        self.poll_secs, self.heal = poll_secs, heal
        self.log = log
        self._stop_event = threading.Event()
        self._known: dict[int, str] = {}  # live stub pid -> model
        self._served = {d.name: fingerprint(d) for d in model_dirs(repository)} if repository else {}
        self._pending: dict[str, tuple] = {}
        self._next_poll = time.monotonic() + poll_secs
        self.heals = 0  # how many reloads healed a model (tests and logs read it)
        # (model, unloaded, serving again): time.monotonic() of each healed outage; between the
        # two, Triton's readiness for the model (and the server's) is not 200.
        self.outages: list[tuple[str, float, float]] = []
        self.rollouts = 0

    # -- Triton's API --------------------------------------------------------------------
    @property
    def client(self) -> httpclient.InferenceServerClient:
        if self._client is None:  # made in the supervising thread: the HTTP client is not thread-safe
            self._client = httpclient.InferenceServerClient(self.http_url, network_timeout=600)
        return self._client

    def load(self, name: str) -> str | None:
        """Load (or reload) ``name``; None when it worked, else Triton's error."""
        try:
            self.client.load_model(name, headers=self.headers)
        except InferenceServerException as e:
            return e.message() or str(e)
        return None

    def unload(self, name: str) -> str | None:
        try:
            self.client.unload_model(name, headers=self.headers)
        except InferenceServerException as e:
            return e.message() or str(e)
        return None

    def _index(self) -> list[dict[str, Any]]:
        try:
            return self.client.get_model_repository_index(headers=self.headers)
        except InferenceServerException:
            return []

    def _expected_processes(self, model: str) -> int:
        """Stub processes a READY python model should have: ready versions x instances."""
        ready = sum(1 for m in self._index() if m.get("name") == model and m.get("state") == "READY")
        if not ready:
            return 0
        try:
            config = self.client.get_model_config(model, headers=self.headers)
        except InferenceServerException:
            return 0
        if config.get("backend") != "python":
            return 0
        return ready * sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or ready

    # -- the loop ------------------------------------------------------------------------
    def stop(self, wait: bool = True) -> None:
        self._stop_event.set()
        if wait and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=30)

    def run(self) -> None:
        self._known = {p.pid: p.model for p in backend_processes(self.server_pid)}
        while not self._stop_event.wait(HEAL_TICK):
            try:
                if self.heal:
                    self._check_backends()
                if self.poll_secs > 0 and time.monotonic() >= self._next_poll:
                    self._check_repository()
                    self._next_poll = time.monotonic() + self.poll_secs
            except OSError as e:  # the server is going away: the launcher deals with that
                if self._stop_event.is_set():
                    return
                self.log(f"[supervisor] cannot reach Triton: {e}")
            except Exception as e:  # whatever happens, keep supervising
                self.log(f"[supervisor] unexpected {type(e).__name__}: {e}")

    def _check_backends(self) -> None:
        now = {p.pid: p.model for p in backend_processes(self.server_pid)}
        gone = {pid: model for pid, model in self._known.items() if pid not in now}
        self._known = now
        alive = Counter(now.values())
        for model in sorted(set(gone.values())):
            if self._stop_event.is_set():
                return
            expected = self._expected_processes(model)
            if alive[model] >= expected:
                continue  # an unload or a rollout ended those processes, not a crash
            pids = ", ".join(str(pid) for pid, m in gone.items() if m == model)
            self.log(f"[supervisor] {model}: backend process {pids} died; reloading the model")
            self._reload(model)
        if gone:
            self._known = {p.pid: p.model for p in backend_processes(self.server_pid)}

    def _reload(self, model: str) -> None:
        """Unload (so nothing calls the model ready while it cannot answer), then load, with
        backoff while the load fails."""
        started, delay = time.monotonic(), 1.0
        self.unload(model)
        unloaded = time.monotonic()
        while not self._stop_event.is_set():
            error = self.load(model)
            if error is None:
                self.outages.append((model, unloaded, time.monotonic()))
                self.heals += 1
                self.log(f"[supervisor] {model}: serving again, {time.monotonic() - started:.1f} s after the crash")
                return
            self.log(f"[supervisor] {model}: reload failed ({error}); trying again in {delay:.0f} s")
            self._stop_event.wait(delay)
            delay = min(2 * delay, 30.0)

    def _check_repository(self) -> None:
        if self.repository is None:
            return
        current = {d.name: fingerprint(d) for d in model_dirs(self.repository)}
        changed = [name for name, fp in current.items() if self._served.get(name) != fp]
        ready = []
        for name in changed:
            if self._pending.get(name) == current[name]:
                ready.append(name)  # unchanged for one whole poll: the writer is done
            else:
                self._pending[name] = current[name]
        # Models before the ensembles that call them; each load also reloads its dependents.
        for name in sorted(ready, key=lambda n: _is_ensemble(self.repository / n)):
            self._pending.pop(name, None)
            self._roll_out(name, current[name])
        for name in set(self._served) - set(current):
            self.log(f"[supervisor] {name}: removed from the repository; unloading")
            self.unload(name)
            del self._served[name]

    def _roll_out(self, name: str, fp: tuple) -> None:
        started = time.monotonic()
        assert self.repository is not None
        if self.shadow is not None:
            refresh_shadow_model(self.repository / name, self.shadow, self.gpu)
        error = self.load(name)
        self._served[name] = fp  # a failed load is not retried until the files change again
        if error is not None:
            self.log(f"[supervisor] {name}: the changed model failed to load: {error}")
            return
        self.rollouts += 1
        versions = self._ready_versions(name)
        self.log(
            f"[supervisor] {name}: repository changed; now serving version {', '.join(versions) or '?'} "
            f"(loaded in {time.monotonic() - started:.1f} s)"
        )

    def _ready_versions(self, name: str) -> list[str]:
        return sorted(
            (str(m.get("version")) for m in self._index() if m.get("name") == name and m.get("state") == "READY"),
            key=lambda v: int(v) if v.isdigit() else -1,
        )


def _is_ensemble(model_dir: Path) -> bool:
    config = model_dir / "config.pbtxt"
    return config.exists() and 'platform: "ensemble"' in config.read_text()
