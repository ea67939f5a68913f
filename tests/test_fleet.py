"""The fleet rehearsed: 2 real Triton replicas (serve/launch.py) behind a real HAProxy on loopback,
under a steady load from the client library over HTTPS and gRPC over TLS (as the Ingress serves it).
A replica's Triton is SIGKILLed, then both are restarted one by one: not one client request may fail.
A replica's Triton is frozen (SIGSTOP) under load from plain tritonclient clients that retry nothing:
HAProxy takes it out of the pool and retries what it held on the other, so no request fails or waits
long; a slow but healthy request is answered once; a whole fleet frozen is refused fast, never queued."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ClientThreads, Looping, make_certificates, served_batch
from photos import photos

from client.inference import ClientError, Tls, TritonClassifier
from deploy.local_fleet import CHECK_INTERVAL_MS, CHECK_TIMEOUT_MS, Fleet, FleetTls
from serve.endpoints import UPSTREAM_BUDGET_S, UPSTREAM_TIMEOUT_S

pytestmark = pytest.mark.slow


class ClientLoad(Looping):
    """Threads classifying through the load balancer back to back; every outcome recorded."""

    def __init__(self, fleet: Fleet, tls: Tls, threads_per_protocol: int = 2) -> None:
        x = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
        self.ok = 0
        self.failures: list[str] = []
        threads = []
        for protocol, url in (("grpc", fleet.grpc_url), ("http", fleet.http_url)):
            classifier = TritonClassifier(url, protocol, retries=6, backoff=0.1, timeout=30, tls=tls)
            for _ in range(threads_per_protocol):
                threads.append(threading.Thread(target=self._loop, args=(classifier.classify_tensors, x)))
        super().__init__(threads, join_timeout=60)

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


# -- a hung replica: plain clients, no retries of their own ----------------------------------------------------

PLAIN_TIMEOUT_S = 10.0  # the clients' patience
SLOWEST_ALLOWED_S = 5.0  # no request may take longer while one replica is frozen
FREEZE_S = 20.0


def plain_client(protocol: str, fleet: Fleet, ca: str) -> Any:
    """A bare tritonclient client over TLS: no retries, the ``PLAIN_TIMEOUT_S`` timeout."""
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(fleet.grpc_url, ssl=True, root_certificates=ca)
    return httpclient.InferenceServerClient(
        fleet.http_url, ssl=True, ssl_options={"ca_certs": ca},
        connection_timeout=PLAIN_TIMEOUT_S, network_timeout=PLAIN_TIMEOUT_S,
    )  # fmt: skip


def infer(client: Any, protocol: str, model: str, name: str, data: np.ndarray, datatype: str) -> None:
    module = grpcclient if protocol == "grpc" else httpclient
    inp = module.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    timeout = {"client_timeout": PLAIN_TIMEOUT_S} if protocol == "grpc" else {}  # HTTP: on the client
    client.infer(model, [inp], **timeout)


class PlainLoad(ClientThreads):
    """2 gRPC and 2 HTTP threads of plain clients sending back to back: (protocol, start, seconds, error)."""

    def __init__(self, fleet: Fleet, ca: str) -> None:
        self.fleet, self.ca = fleet, ca
        self.x = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
        super().__init__(("grpc", "grpc", "http", "http"), join_timeout=2 * PLAIN_TIMEOUT_S)

    def client(self, protocol: str) -> Any:
        return plain_client(protocol, self.fleet, self.ca)

    def send(self, client: Any, protocol: str, n: int) -> None:
        infer(client, protocol, "threegnet", "image", self.x, "UINT8")

    def outcome(self, protocol: str, start: float, result: None, error: str | None) -> tuple:
        return protocol, start, time.monotonic() - start, error

    def failures(self) -> list[str]:
        return [f"{p} at +{s:.1f} s after {d:.1f} s: {e}" for p, s, d, e in self.outcomes if e]

    def slowest(self, protocol: str) -> float:
        return max(d for p, _, d, _ in self.outcomes if p == protocol)


def counters(fleet: Fleet, column: str) -> dict[tuple[str, str], int]:
    """A per-server counter of HAProxy's stats CSV (wretr: retries, wredis: redispatches)."""
    return {key: int(value or 0) for key, value in fleet._stats(column).items()}


def successes(fleet: Fleet, model: str) -> int:
    """Requests ``model`` answered, summed over the replicas (their statistics API, on their own ports)."""
    total = 0
    for r in fleet.replicas:
        request = urllib.request.Request(f"http://127.0.0.1:{r.http_port}/v2/models/{model}/stats",
                                         headers=fleet.control_headers)  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            stats = json.loads(answer.read())
        total += sum(m["inference_stats"]["success"]["count"] for m in stats["model_stats"])
    return total


@pytest.fixture(scope="module")
def ca(certificates) -> str:
    return str(certificates.ca)


def test_a_hung_replica_costs_no_request_and_leaves_the_pool_until_it_thaws(fleet, ca):
    victim = fleet.replicas[0]
    starts = victim.starts
    wait_state(fleet, victim.name, {"UP"}, timeout=240)  # after the tests above
    retried = counters(fleet, "wretr")
    with PlainLoad(fleet, ca) as load:
        time.sleep(3)
        pid = victim.triton_pid()
        assert pid is not None
        frozen = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            left = wait_state(fleet, victim.name, {"DOWN"}, timeout=FREEZE_S)
            time.sleep(max(0.0, FREEZE_S - (time.monotonic() - frozen)))
            assert fleet.replica_state(victim.name) == {"DOWN"}  # out of the pool the whole freeze
        finally:
            os.kill(pid, signal.SIGCONT)
        back = wait_state(fleet, victim.name, {"UP"}, timeout=30)
        time.sleep(3)
    sent = {p: sum(o[0] == p for o in load.outcomes) for p in ("grpc", "http")}
    retries = {key: n - retried[key] for key, n in counters(fleet, "wretr").items() if n != retried[key]}
    print(f"out of the pool {left:.2f} s after the freeze (check every {CHECK_INTERVAL_MS} ms, timeout "
          f"{CHECK_TIMEOUT_MS} ms), back {back:.2f} s after the thaw; requests {sent}; slowest gRPC "
          f"{load.slowest('grpc'):.2f} s, HTTP {load.slowest('http'):.2f} s; HAProxy retries {retries}")  # fmt: skip
    assert not load.failures(), load.failures()[:5]
    assert load.slowest("grpc") < SLOWEST_ALLOWED_S and load.slowest("http") < SLOWEST_ALLOWED_S
    assert all(n > 20 for n in sent.values()), sent  # the other replica answered meanwhile
    assert left < (CHECK_INTERVAL_MS + CHECK_TIMEOUT_MS) / 1000 + 2  # + a busy machine's scheduling
    assert victim.starts == starts  # thawed, not restarted: the same Triton serves again


def test_a_slow_but_healthy_request_is_answered_once(fleet, ca):
    """The largest batch of camera photos a replica takes (8, predict.py's default; 4 on a CPU) through the
    bytes ensemble takes up to ~2 s at full load: under the server timeout, so HAProxy neither cuts nor
    retries it (and at 2-4 MB it would not fit its buffer to be retried)."""
    camera = next(p for p in photos() if p.name == "camera_jpeg").data
    batch = np.array([[camera]] * min(8, served_batch()), dtype=object)
    retried, redispatched = counters(fleet, "wretr"), counters(fleet, "wredis")
    answered_before = successes(fleet, "threegnet_image")
    took = []
    with PlainLoad(fleet, ca) as load:
        for protocol in ("grpc", "http", "grpc", "http"):
            client = plain_client(protocol, fleet, ca)
            start = time.monotonic()
            infer(client, protocol, "threegnet_image", "image_bytes", batch, "BYTES")
            took.append(time.monotonic() - start)
            client.close()
    print(f"{len(batch)} camera photos: {', '.join(f'{t:.2f}' for t in took)} s (timeout {UPSTREAM_TIMEOUT_S} s)")
    assert not load.failures(), load.failures()[:5]
    assert successes(fleet, "threegnet_image") - answered_before == len(took)  # each run once, by one replica
    assert counters(fleet, "wretr") == retried and counters(fleet, "wredis") == redispatched


def test_a_whole_fleet_frozen_is_refused_fast_not_queued(fleet, ca):
    """Beyond what retries can save: every request ends with an error well before the client's patience."""
    pids = [r.triton_pid() for r in fleet.replicas]
    assert None not in pids
    with PlainLoad(fleet, ca) as load:
        time.sleep(2)
        frozen = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            for r in fleet.replicas:
                wait_state(fleet, r.name, {"DOWN"}, timeout=10)
            time.sleep(5)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        for r in fleet.replicas:
            wait_state(fleet, r.name, {"UP"}, timeout=30)
    during = [o for o in load.outcomes if o[1] + o[2] >= frozen]  # in flight at the freeze, or sent after it
    errors = [o for o in during if o[3]]
    print(f"{len(during)} requests in flight at the freeze or sent during it, {len(errors)} refused, slowest "
          f"{max(d for _, _, d, _ in during):.2f} s")  # fmt: skip
    assert errors and all(d < UPSTREAM_BUDGET_S for _, _, d, _ in during), during[:5]
    # Refusals: HTTP 503, gRPC UNAVAILABLE. A request the frozen replica held ends after the server timeout, its
    # retry finding no replica: gRPC gets its stream reset (UNAVAILABLE), HTTP its keep-alive connection closed
    # (HAProxy's sign that the request was not processed and may be sent again).
    odd = [o for o in errors if not any(m in o[3] for m in ("503", "UNAVAILABLE", "connection closed"))]
    assert not odd, odd[:3]


def test_bodies_triton_cannot_bound_are_refused_at_the_balancer(fleet, ca):
    """Triton 2.51 inflates compressed bodies and buffers any size: the balancer refuses both, and a body
    whose size it is not told, before a replica sees a byte of it."""
    import gzip
    import http.client
    import ssl

    from serve.endpoints import MAX_REQUEST_MB

    context = ssl.create_default_context(cafile=str(ca))

    def status(headers: dict[str, str], body: bytes | None = None) -> int:
        connection = http.client.HTTPSConnection(fleet.host, fleet.http_port, context=context, timeout=30)
        try:
            connection.putrequest("POST", "/v2/models/threegnet_image/infer", skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders(body)
            return connection.getresponse().status
        finally:
            connection.close()

    small = gzip.compress(b"{}" * 1000)
    assert status({"Content-Encoding": "gzip", "Content-Length": str(len(small))}, small) == 415
    too_big = str(MAX_REQUEST_MB * 1024 * 1024 + 1)
    assert status({"Content-Length": too_big}) == 413  # refused on the header: the body is never sent
    assert status({"Transfer-Encoding": "chunked"}, b"0\r\n\r\n") == 411
    # A plain, announced body passes to Triton, which answers for itself (it rejects this one as incomplete).
    assert status({"Content-Length": "2"}, b"{}") not in (403, 411, 413, 415)
    assert set(fleet.states().values()) == {"UP"}
