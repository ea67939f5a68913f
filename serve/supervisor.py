"""Keeping a running Triton's models serving: self-healing and zero-downtime rollouts.

Triton runs with ``--model-control-mode=explicit``; this thread, beside it in the
launcher, uses Triton's own repository API (load, unload, index) through ``tritonclient``,
with the operators' key (serve/control.py, serve/triton_api.py). The HTTP client is not
thread-safe, so this one thread makes every call: every ``HEAL_TICK`` seconds it heals the
models whose backend processes died (serve/healing.py), then, every ``poll_secs``, rolls out
what changed in the model repository, verified versions only, pins honoured (serve/rollouts.py).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import tritonclient.http as httpclient

from serve.healing import HEAL_TICK, BackendProcess, Healer, backend_processes
from serve.rollouts import RepositoryFollower, fingerprint, read_pins
from serve.triton_api import TritonAPI

__all__ = ["HEAL_TICK", "BackendProcess", "Supervisor", "backend_processes", "fingerprint", "read_pins"]


class Supervisor(threading.Thread):
    """Heals dead backend processes and follows the model repository; see the module doc."""

    def __init__(
        self,
        http_url: str,
        server_pid: int,
        repository: Path | None,  # None: a remote repository, not watched
        shadow: Path | None,
        gpu: bool = False,
        standin: bool = True,  # the shadow runs ONNX models through the stand-in (no onnxruntime backend)
        poll_secs: float = 2.0,
        heal: bool = True,
        log: Callable[[str], None] = print,
        headers: dict[str, str] | None = None,
        infer_headers: dict[str, str] | None = None,
        pins: Path | None = None,
    ) -> None:
        super().__init__(name="triton-supervisor", daemon=True)
        self.poll_secs, self.heal = poll_secs, heal
        self.log = log
        self._stop_event = threading.Event()
        self.api = TritonAPI(http_url, headers)
        self.follower = RepositoryFollower(self.api, repository, shadow, gpu, standin, log, infer_headers, pins)
        self.healer = Healer(self.api, server_pid, self.follower.load, self._stop_event, log)
        self._next_poll = time.monotonic() + poll_secs

    # -- the parts' state and operations, for the launcher, the metrics and the tests ------
    @property
    def server_pid(self) -> int:
        return self.healer.server_pid

    @server_pid.setter
    def server_pid(self, pid: int) -> None:  # set once Triton runs (and again when it restarts)
        self.healer.server_pid = pid

    @property
    def heals(self) -> int:
        return self.healer.heals

    @property
    def outages(self) -> list[tuple[str, float, float]]:
        return self.healer.outages

    @property
    def rollouts(self) -> int:
        return self.follower.rollouts

    @property
    def rolled_out(self) -> Counter[str]:
        return self.follower.rolled_out

    @property
    def serving(self) -> dict[str, list[int]]:
        return self.follower.serving

    @property
    def rejected(self) -> int:
        return self.follower.rejected

    @property
    def rejections(self) -> list[tuple[str, int, str]]:
        return self.follower.rejections

    @property
    def client(self) -> httpclient.InferenceServerClient:
        return self.api.client

    def models(self) -> list[str]:
        return self.follower.models()

    @property
    def rolling_out(self) -> bool:
        return self.follower.rolling_out

    def queue_sizes(self) -> dict[str, int]:
        return self.follower.queue_sizes()

    def pins(self) -> dict[str, int]:
        return self.follower.pins()

    def prepare(self) -> list[str]:
        return self.follower.prepare()

    def serve_verified(self, name: str) -> str | None:
        return self.follower.serve_verified(name)

    def load(self, name: str, versions: list[int] | None = None) -> str | None:
        return self.follower.load(name, versions)

    def unload(self, name: str) -> str | None:
        return self.api.unload(name)

    # -- the loop ------------------------------------------------------------------------
    def stop(self, wait: bool = True) -> None:
        self._stop_event.set()
        if wait and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=30)

    def run(self) -> None:
        self.healer.start()
        while not self._stop_event.wait(HEAL_TICK):
            try:
                if self.heal:
                    self.healer.check()
                if self.poll_secs > 0 and time.monotonic() >= self._next_poll:
                    self.follower.check()
                    self._next_poll = time.monotonic() + self.poll_secs
            except OSError as e:  # the server is going away: the launcher deals with that
                if self._stop_event.is_set():
                    return
                self.log(f"[supervisor] cannot reach Triton: {e}")
            except Exception as e:  # whatever happens, keep supervising
                self.log(f"[supervisor] unexpected {type(e).__name__}: {e}")
