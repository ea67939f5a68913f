"""The fleet rehearsed: 2 real Triton replicas (serve/launch.py) behind a real HAProxy on loopback,
under a steady load from the client library over HTTPS and gRPC over TLS (as the Ingress serves it).
A replica's Triton is SIGKILLed, then both are restarted one by one: not one client request may fail."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from helpers import make_certificates

from client.inference import ClientError, Tls, TritonClassifier
from deploy.local_fleet import CHECK_INTERVAL_MS, Fleet, FleetTls

pytestmark = pytest.mark.slow


class ClientLoad:
    """Threads classifying through the load balancer back to back; every outcome recorded."""

    def __init__(self, fleet: Fleet, tls: Tls, threads_per_protocol: int = 2) -> None:
        x = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
        self.ok = 0
        self.failures: list[str] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.threads = []
        for protocol, url in (("grpc", fleet.grpc_url), ("http", fleet.http_url)):
            classifier = TritonClassifier(url, protocol, retries=6, backoff=0.1, timeout=30, tls=tls)
            for _ in range(threads_per_protocol):
                self.threads.append(threading.Thread(target=self._loop, args=(classifier.classify_tensors, x)))

    def _loop(self, classify: Callable, x: np.ndarray) -> None:
        while not self.halt.is_set():
            try:
                classify(x, top_k=2)
                with self.lock:
                    self.ok += 1
            except ClientError as e:
                with self.lock:
                    self.failures.append(f"{type(e).__name__}: {e}")
            time.sleep(0.01)

    def __enter__(self) -> ClientLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(timeout=60)

    def wait_for(self, count: int, timeout: float = 60) -> None:
        target, deadline = self.ok + count, time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"load stalled at {self.ok} answers; failures {self.failures[:3]}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def tls(certificates) -> Tls:
    return Tls(ca=str(certificates.ca))


@pytest.fixture(scope="module")
def fleet(model_repository, certificates):
    with Fleet(model_repository, replicas=2, tls=FleetTls(certificates.server_cert, certificates.server_key)) as fleet:
        yield fleet


def wait_state(fleet: Fleet, name: str, wanted: set[str], timeout: float) -> float:
    start = time.monotonic()
    while fleet.replica_state(name) != wanted:
        assert time.monotonic() - start < timeout, f"{name}: {fleet.states()}, wanted {wanted}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_both_replicas_are_in_the_pool_and_share_the_load(fleet, tls):
    assert set(fleet.states().values()) == {"UP"} and len(fleet.states()) == 4  # 2 replicas x (HTTP, gRPC)
    before = fleet.sessions()
    with ClientLoad(fleet, tls) as load:
        load.wait_for(40)
    assert not load.failures
    served = {key: n - before[key] for key, n in fleet.sessions().items()}
    assert all(served[("triton_grpc", r.name)] > 0 for r in fleet.replicas), served  # gRPC: spread per request
    assert all(TritonClassifier(f"127.0.0.1:{r.http_port}", "http").health().ready for r in fleet.replicas)


def test_a_replica_sigkilled_under_load_costs_no_request_and_rejoins_after_its_restart(fleet, tls):
    victim = fleet.replicas[0]
    starts, restarts = victim.starts, fleet.restarts
    with ClientLoad(fleet, tls) as load:
        load.wait_for(20)
        os.kill(victim.triton_pid(), signal.SIGKILL)
        left = wait_state(fleet, victim.name, {"DOWN"}, timeout=30)
        load.wait_for(20)  # the other replica answers everything meanwhile
        rejoined = wait_state(fleet, victim.name, {"UP"}, timeout=240)
        load.wait_for(20)
    print(f"left the pool {left:.2f} s after the kill (check interval {CHECK_INTERVAL_MS} ms); "
          f"back {left + rejoined:.1f} s after it; {load.ok} answers")  # fmt: skip
    assert not load.failures, load.failures[:5]
    assert victim.starts == starts + 1 and fleet.restarts == restarts + 1  # restarted by the fleet, not by hand


def test_a_rolling_restart_under_load_costs_no_request(fleet, tls):
    starts = [r.starts for r in fleet.replicas]
    with ClientLoad(fleet, tls) as load:
        load.wait_for(20)
        fleet.rolling_restart()
        load.wait_for(20)
    assert not load.failures, load.failures[:5]
    assert [r.starts for r in fleet.replicas] == [s + 1 for s in starts]
    assert set(fleet.states().values()) == {"UP"}
