"""Attacks on a real server: what a client without the operators' key can do to it (nothing that
changes what is served), where the key could leak (nowhere), and TLS that really refuses."""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import CONTROL_PLANE_PATHS, DATA_PLANE_PATHS, ROOT, Certificates, make_certificates
from PIL import Image
from tritonclient.utils import InferenceServerException

from client.inference import AccessDenied, ServerUnreachable, Tls, TritonClassifier
from deploy.local_fleet import Fleet, FleetTls
from serve.control import INFERENCE_KEY_HEADER, grpc_headers, http_headers
from serve.endpoints import CONTROL_KEY_HEADER
from serve.server import GrpcTls, TritonServer, free_port
from serve.supervisor import backend_processes

pytestmark = pytest.mark.slow

INTRUDER_CONFIG = json.dumps(
    {
        "name": "intruder",
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
        "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}],
    }
)
INTRUDER_CODE = """
class TritonPythonModel:
    def initialize(self, args):
        open({marker!r}, "w").write("the intruder ran")
    def execute(self, requests):
        return []
"""


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


class Launched:
    """``serve/launch.py`` as operators run it, with a key file; its output kept."""

    def __init__(self, repository: Path, key_file: Path | None, *extra: str, env: dict[str, str] | None = None) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        cmd = [
            sys.executable,
            "serve/launch.py",
            "--model-repository",
            str(repository),
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--supervisor-metrics-port",
            str(free_port()),
            "--exit-timeout",
            "3",
            *(["--control-key-file", str(key_file)] if key_file else []),
            *extra,
        ]
        self.process = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.output: list[str] = []
        self._reader = threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 240
        while not any("Triton is ready" in line for line in self.output):
            assert self.process.poll() is None, "".join(self.output)
            assert time.monotonic() < deadline, "".join(self.output)
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "control-key"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def locked(model_repository: Path, key_file: Path):
    server = Launched(model_repository, key_file)
    yield server
    server.stop()


def attacks(module, client, marker: Path) -> dict[str, Callable[[], object]]:
    """Every category of Triton's API that changes or reveals what is served, without the key."""
    code = INTRUDER_CODE.format(marker=str(marker)).encode()
    grpc = module is grpcclient
    return {
        "load a model with code": lambda: client.load_model(
            "intruder", config=INTRUDER_CONFIG, files={"file:1/model.py": code}
        ),
        "reload with a new config": lambda: client.load_model("threegnet", config=json.dumps({"max_batch_size": 1})),
        "unload": lambda: client.unload_model("threegnet"),
        "repository index": lambda: client.get_model_repository_index(),
        "read the config": lambda: client.get_model_config("threegnet"),
        "statistics": lambda: client.get_inference_statistics("threegnet"),
        "register shared memory": lambda: client.register_system_shared_memory("r", "/threegnet-test", 64),
        "shared memory status": lambda: client.get_system_shared_memory_status(),
        "trace settings": lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
        "log settings": lambda: client.update_log_settings({"log_verbose_level": 1} if grpc else {"log_info": False}),
    }


def answers(url: str, protocol: str) -> bool:
    x = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    return len(TritonClassifier(url, protocol).classify_tensors(x, top_k=1)) == 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_without_the_key_no_client_changes_or_reads_the_control_plane(locked, protocol, tmp_path):
    module = grpcclient if protocol == "grpc" else httpclient
    url = locked.grpc_url if protocol == "grpc" else locked.http_url
    client = module.InferenceServerClient(url)
    marker = tmp_path / "intruder-ran"
    refused = {}
    for name, attack in attacks(module, client, marker).items():
        with pytest.raises(InferenceServerException) as e:
            attack()
        refused[name] = e.value.message()
    expected = f"expecting header '{'triton-grpc-protocol-' if protocol == 'grpc' else ''}{CONTROL_KEY_HEADER}'"
    assert all("restricted" in m and expected in m for m in refused.values()), refused
    time.sleep(1)  # a model load that slipped through would have run initialize() by now
    assert not marker.exists()
    assert client.is_model_ready("threegnet") and client.is_server_ready()  # health and metadata stay open
    assert client.get_model_metadata("threegnet")
    assert answers(url, protocol)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_with_the_key_the_same_load_runs_the_code_so_the_lock_is_what_stopped_it(locked, key_file, protocol, tmp_path):
    key = key_file.read_text().strip()
    module = grpcclient if protocol == "grpc" else httpclient
    headers = (grpc_headers if protocol == "grpc" else http_headers)(key)
    client = module.InferenceServerClient(locked.grpc_url if protocol == "grpc" else locked.http_url)
    marker = tmp_path / "intruder-ran"
    code = INTRUDER_CODE.format(marker=str(marker)).encode()
    client.load_model("intruder", config=INTRUDER_CONFIG, files={"file:1/model.py": code}, headers=headers)
    try:
        assert marker.read_text() == "the intruder ran"
    finally:
        client.unload_model("intruder", headers=headers)
    assert client.get_model_config("threegnet", headers=headers)


def key_leaks(launched: Launched, key: str) -> list[str]:
    """Where a local user (or a backend's code) could read the key: process titles, the backends'
    environments, the launcher's output."""
    found = []
    pgrep = ["pgrep", "-P", str(launched.process.pid), "tritonserver"]
    triton = int(subprocess.run(pgrep, capture_output=True, text=True).stdout.split()[0])
    stubs = backend_processes(triton)
    assert stubs, "no backend processes found"
    for pid in (launched.process.pid, triton, *(s.pid for s in stubs)):
        if key.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            found.append(f"command line of {pid}")
    assert b"@env:" in Path(f"/proc/{triton}/cmdline").read_bytes()  # the placeholder, not the key
    for stub in stubs:  # the backends start without the server's copy of the key in their environment
        if key.encode() in Path(f"/proc/{stub.pid}/environ").read_bytes():
            found.append(f"environment of backend {stub.pid}")
    found += [f"output: {line!r}" for line in launched.output if key in line]
    return found


def test_the_key_is_in_no_process_title_backend_environment_or_log_line(locked, key_file):
    key = key_file.read_text().strip()
    assert key_leaks(locked, key) == []
    with pytest.raises(InferenceServerException) as e:  # a refused request names the header, not the key
        httpclient.InferenceServerClient(locked.http_url).unload_model("threegnet", headers={CONTROL_KEY_HEADER: "x"})
    assert key not in e.value.message()
    assert any("Locked: model-repository, model-config" in line for line in locked.output)


def test_a_key_given_in_the_environment_stays_out_of_the_backends_too(model_repository):
    """The fleet hands its replicas the key as $THREEGNET_CONTROL_KEY: tritonserver must not pass it on."""
    key = secrets.token_hex(24)
    launched = Launched(model_repository, None, env={"THREEGNET_CONTROL_KEY": key})
    try:
        assert key_leaks(launched, key) == []
        client = httpclient.InferenceServerClient(launched.http_url)
        assert client.get_model_config("threegnet", headers=http_headers(key))["name"] == "threegnet"
    finally:
        launched.stop()


def test_the_default_key_is_random_and_locks_all_the_same(triton):
    """No key given (the test fixture, ``make demo``): a fresh random key, never empty."""
    assert len(triton.lock.control_key) >= 32
    with pytest.raises(InferenceServerException, match="restricted"):
        httpclient.InferenceServerClient(triton.http_url).unload_model("threegnet")
    other = TritonServer(triton.repository)  # not started: just its key
    assert other.lock.control_key != triton.lock.control_key


@pytest.mark.parametrize("content", ["short", "has spaces in it but is long enough", ""])
def test_an_unusable_key_file_is_refused_before_starting_and_never_echoed(model_repository, tmp_path, content):
    bad = tmp_path / "key"
    bad.write_text(content)
    result = subprocess.run(
        [
            sys.executable,
            "serve/launch.py",
            "--model-repository",
            str(model_repository),
            "--control-key-file",
            str(bad),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"the control key in {bad} is not usable" in result.stderr
    assert not content or content not in result.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "serve/launch.py",
            "--model-repository",
            str(model_repository),
            "--control-key-file",
            str(tmp_path / "nope"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "cannot read the control key file" in missing.stderr


def test_an_inference_key_locks_inference_but_not_health_or_metadata(model_repository, tmp_path):
    key = secrets.token_urlsafe(32)
    (tmp_path / "inference-key").write_text(key)
    server = TritonServer(
        model_repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        exit_timeout=3,
        inference_key=key,
    )
    with server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            with pytest.raises(AccessDenied, match=INFERENCE_KEY_HEADER):
                TritonClassifier(url, protocol).classify_tensors(np.zeros((1, 64, 64, 3), np.uint8))
            keyed = TritonClassifier(url, protocol, inference_key=key)
            assert keyed.health().ready and keyed.describe().name == "threegnet"
            assert len(keyed.classify_tensors(np.zeros((1, 64, 64, 3), np.uint8))) == 1
        image = tmp_path / "grey.png"
        Image.new("RGB", (80, 80), (120, 120, 120)).save(image)
        predict = [sys.executable, "client/predict.py", str(image), "--url", server.grpc_url]
        without = subprocess.run(predict, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert without.returncode == 2 and INFERENCE_KEY_HEADER in without.stderr
        assert "Traceback" not in without.stderr
        keyed_run = subprocess.run(
            [*predict, "--inference-key-file", str(tmp_path / "inference-key")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert keyed_run.returncode == 0, keyed_run.stderr


@pytest.fixture(scope="module")
def tls_servers(model_repository, certificates):
    """Two servers: gRPC over TLS, and over mutual TLS."""
    c = certificates
    plain_tls = GrpcTls(c.server_cert, c.server_key)
    mutual = GrpcTls(c.server_cert, c.server_key, client_ca=c.ca)
    servers = [
        TritonServer(
            model_repository,
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            exit_timeout=3,
            grpc_tls=tls,
            heal=False,
            poll_secs=0,
        )
        for tls in (plain_tls, mutual)
    ]
    for s in servers:
        s.start()
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


def classify(url: str, tls: Tls | None, retries: int = 0) -> int:
    return len(
        TritonClassifier(url, "grpc", tls=tls, retries=retries).classify_tensors(np.zeros((1, 64, 64, 3), np.uint8))
    )


def test_grpc_over_tls_answers_verified_clients_and_refuses_plaintext(tls_servers, certificates):
    server = tls_servers[0]
    assert classify(server.grpc_url, Tls(ca=str(certificates.ca))) == 1
    with pytest.raises(ServerUnreachable):
        classify(server.grpc_url, None)  # plaintext to a TLS port
    with pytest.raises(ServerUnreachable):
        classify(server.grpc_url, Tls(ca=str(certificates.other_ca)))  # a server this CA did not sign
    image = certificates.ca.parent / "grey.png"
    Image.new("RGB", (80, 80), (90, 120, 150)).save(image)
    cli = subprocess.run(
        [
            sys.executable,
            "client/predict.py",
            str(image),
            "--url",
            server.grpc_url,
            "--ca",
            str(certificates.ca),
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout.splitlines()[0])["top_k"]


def test_mutual_tls_refuses_a_client_without_a_certificate(tls_servers, certificates):
    server, c = tls_servers[1], certificates
    with pytest.raises(ServerUnreachable):
        classify(server.grpc_url, Tls(ca=str(c.ca)))
    assert classify(server.grpc_url, Tls(ca=str(c.ca), cert=str(c.client_cert), key=str(c.client_key))) == 1
    # The control plane over TLS still wants the key.
    with pytest.raises(InferenceServerException, match="restricted"):
        grpcclient.InferenceServerClient(
            server.grpc_url,
            ssl=True,
            root_certificates=str(c.ca),
            private_key=str(c.client_key),
            certificate_chain=str(c.client_cert),
        ).unload_model("threegnet")


def test_the_load_balancer_forwards_only_the_data_plane_and_speaks_only_tls(model_repository, certificates):
    c = certificates
    with Fleet(model_repository, replicas=1, tls=FleetTls(c.server_cert, c.server_key, client_ca=c.ca)) as fleet:
        context = ssl.create_default_context(cafile=str(c.ca))
        context.load_cert_chain(str(c.client_cert), str(c.client_key))

        def status(path: str, headers: dict[str, str] | None = None) -> int:
            request = urllib.request.Request(f"https://{fleet.http_url}{path}", headers=headers or {})
            try:
                with urllib.request.urlopen(request, context=context, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        # Every control path is refused by HAProxy itself, also with the operators' key.
        refused = {p: status(p, fleet.control_headers) for p in CONTROL_PLANE_PATHS}
        assert set(refused.values()) == {403}, refused
        passed = {p: status(p) for p in DATA_PLANE_PATHS}
        assert all(code != 403 for code in passed.values()), passed
        assert status("/v2/health/ready") == 200
        # HTTPS and gRPC over TLS round trips; the client certificate is required (mutual TLS).
        tls = Tls(ca=str(c.ca), cert=str(c.client_cert), key=str(c.client_key))
        for protocol, url in (("http", fleet.http_url), ("grpc", fleet.grpc_url)):
            classifier = TritonClassifier(url, protocol, tls=tls, retries=0)
            assert len(classifier.classify_tensors(np.zeros((1, 64, 64, 3), np.uint8))) == 1
            assert not TritonClassifier(url, protocol, tls=Tls(ca=str(c.ca)), retries=0).health().live  # no cert
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to the TLS port: cut off
            urllib.request.urlopen(f"http://{fleet.http_url}/v2/health/ready", timeout=5)
        # The gRPC control plane through the balancer: refused before any replica sees it.
        client = grpcclient.InferenceServerClient(
            fleet.grpc_url,
            ssl=True,
            root_certificates=str(c.ca),
            private_key=str(c.client_key),
            certificate_chain=str(c.client_cert),
        )
        with pytest.raises(InferenceServerException):
            client.get_model_repository_index(headers=fleet.grpc_control_headers)
        with pytest.raises(InferenceServerException):
            client.unload_model("threegnet", headers=fleet.grpc_control_headers)
        assert client.is_model_ready("threegnet")
