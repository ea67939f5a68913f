"""Hostile requests against a real server: malformed images, thin images that would blow up in the
resize, bursts of camera-sized photos, oversized and compressed bodies. Whatever one request does,
the others are answered, the server stays ready, and its memory stays bounded and comes back.

Memory is the server's process tree (tritonserver and its python-backend stubs) read from /proc:
PSS, because the stubs' shared-memory regions are mapped by tritonserver too and RSS would count
them twice. Measured numbers: docs/performance.md#8-hostile-requests-and-memory-after-bursts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import socket
import sys
import threading
import time
import types
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, decoder_regressions, format_seeds, good_png, infer, infer_body, mutations, post, thin_png
from photos import scene
from PIL import Image

from export.triton_config import parse_pbtxt
from serve.server import TritonServer, free_port

MIB = 1 << 20


# -- the preprocessing model itself, with a stand-in for Triton's pb_utils: no server needed ----------


class _FakePbUtils(types.ModuleType):
    """What ``image_preprocess.py`` uses of ``triton_python_backend_utils``, recorded."""

    class TritonError:
        INVALID_ARG, INTERNAL, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "UNAVAILABLE"

        def __init__(self, message: str, code: str = "UNKNOWN") -> None:
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None) -> None:
            self.outputs, self.error = output_tensors or [], error

    class Logger:
        lines: list[str] = []  # noqa: RUF012 - shared on purpose: what the model logged

        @classmethod
        def log_error(cls, message: str) -> None:
            cls.lines.append(message)

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request[name]


class _Input:
    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs

    def as_numpy(self) -> np.ndarray:
        return np.array(self.blobs, dtype=object).reshape(-1, 1)


@pytest.fixture
def preprocess_model(monkeypatch):
    """``serve/triton_models/image_preprocess.py`` loaded as Triton loads it, initialized for 64x64 crops."""
    pb_utils = _FakePbUtils("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    spec = importlib.util.spec_from_file_location("image_preprocess", ROOT / "serve/triton_models/image_preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    pp = {"resize": 73, "crop": 64}
    model.initialize({"model_config": json.dumps({"parameters": {"preprocessing": {"string_value": json.dumps(pp)}}})})
    return model, module, pb_utils


def _assert_clean(message: str) -> None:
    """One line for the client: no traceback, no file of the server's."""
    assert "\n" not in message and "Traceback" not in message, message
    assert ".py" not in message and str(ROOT) not in message and "site-packages" not in message, message


def test_each_request_of_a_batch_gets_its_own_answer(preprocess_model, monkeypatch):
    """Every malformed file found by the mutation corpus, plus a decoder that raises what nobody
    expected, batched between good requests: the good ones get their tensors, each bad one its own
    one-line error; nothing escapes ``execute`` (which would fail the whole batch)."""
    model, module, pb_utils = preprocess_model
    bad = dict(decoder_regressions())
    bad["thin"] = thin_png(8, 100_000)
    bad["one bad image of two"] = [good_png(), b"junk"]
    batch, names = [], []
    for i, (name, blob) in enumerate(bad.items()):
        batch += [
            {"image_bytes": _Input([good_png(i)])},
            {"image_bytes": _Input(blob if isinstance(blob, list) else [blob])},
        ]
        names += ["good", name]
    responses = model.execute(batch)
    assert len(responses) == len(batch)
    for response, name in zip(responses, names, strict=True):
        if name == "good":
            assert response.error is None and response.outputs[0].array.shape == (1, 64, 64, 3), name
        else:
            assert response.error is not None and response.error.code == "INVALID_ARG", name
            _assert_clean(response.error.message)
    assert "image 2 of 2: not an image" in responses[-1].error.message

    def surprise(*args, **kwargs):
        raise KeyError("/opt/secret/path.py")

    monkeypatch.setattr(module, "load_and_preprocess", surprise)
    (response,) = model.execute([{"image_bytes": _Input([good_png()])}])
    assert response.error.code == "INVALID_ARG"
    assert response.error.message == "the image could not be preprocessed (KeyError)"
    assert any("/opt/secret/path.py" in line for line in pb_utils.Logger.lines)  # the operators still see it
    monkeypatch.setattr(module, "load_and_preprocess", lambda *a, **k: np.zeros((64, 64, 3), np.uint8))

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(module, "np", types.SimpleNamespace(stack=no_memory))
    (response,) = model.execute([{"image_bytes": _Input([good_png()])}])
    assert response.error.code == "UNAVAILABLE" and "out of memory" in response.error.message


# -- against a real server ------------------------------------------------------------------------------


def tree_memory(pgid: int) -> dict[str, float]:
    """MiB of the server's process group: PSS (what the bounds use), RSS, tritonserver's own RSS, and
    the python backend's shared-memory regions (the tmpfs pages of the /dev/shm files it maps)."""
    pss = rss = server = 0.0
    regions: set[str] = set()
    for folder in Path("/proc").iterdir():
        if not folder.name.isdigit():
            continue
        try:
            fields = (folder / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            rollup = dict(line.split(":", 1) for line in (folder / "smaps_rollup").read_text().splitlines()[1:])
            comm = (folder / "comm").read_text().strip()
            maps = (folder / "maps").read_text().splitlines()
        except (OSError, ValueError):
            continue  # gone meanwhile
        kib = {k: int(v.split()[0]) for k, v in rollup.items() if k in ("Rss", "Pss")}
        pss, rss = pss + kib.get("Pss", 0) / 1024, rss + kib.get("Rss", 0) / 1024
        server += kib.get("Rss", 0) / 1024 if comm == "tritonserver" else 0
        regions.update(line.split(None, 5)[5] for line in maps if "/dev/shm/" in line and len(line.split(None, 5)) == 6)
    shm = 0.0
    for region in regions:
        with contextlib.suppress(OSError):
            shm += os.stat(region).st_blocks * 512 / MIB
    return {"pss_mb": round(pss), "rss_mb": round(rss), "tritonserver_rss_mb": round(server), "shm_mb": round(shm)}


class Peak(threading.Thread):
    """The largest tree memory seen, sampled every 0.2 s until stopped."""

    def __init__(self, pgid: int) -> None:
        super().__init__(daemon=True)
        self.pgid, self.halt = pgid, threading.Event()
        self.peak = tree_memory(pgid)

    def run(self) -> None:
        while not self.halt.is_set():
            now = tree_memory(self.pgid)
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            time.sleep(0.2)

    def stop(self) -> dict[str, float]:
        self.halt.set()
        self.join(timeout=10)
        return self.peak


class GoodLoad(threading.Thread):
    """Ordinary requests one after another (small PNGs), each recorded as (status, seconds, text)."""

    def __init__(self, server: TritonServer) -> None:
        super().__init__(daemon=True)
        self.server, self.halt = server, threading.Event()
        self.results: list[tuple[int, float, str]] = []
        self.blob = good_png(7)

    def run(self) -> None:
        while not self.halt.is_set():
            start = time.monotonic()
            status, text = infer(self.server, self.blob, timeout=60)
            self.results.append((status, time.monotonic() - start, text[:300]))

    def stop(self) -> list[tuple[int, float, str]]:
        self.halt.set()
        self.join(timeout=90)
        return self.results


@pytest.fixture(scope="module")
def server(model_repository: Path):
    """A server of this module's own: the memory bounds need one that no other test loads."""
    with TritonServer(
        model_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), exit_timeout=3
    ) as s:
        assert infer(s, good_png())[0] == 200  # every stub has run once: its imports are resident
        yield s


def stub_pids(server: TritonServer) -> set[int]:
    """The processes of the server's group: a backend that crashed and was reloaded has a new one."""
    pids = set()
    for folder in Path("/proc").iterdir():
        try:
            if (
                folder.name.isdigit()
                and int((folder / "stat").read_text().rsplit(")", 1)[1].split()[2]) == server.process.pid
            ):
                pids.add(int(folder.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.slow
def test_malformed_images_fail_alone_while_good_requests_pass(server):
    """The malformed files (bad EXIF, broken AVIF/HEIC boxes, the mutation corpus of every format)
    sent among 120 good requests, 8 at a time so that they share batches: all 120 good ones answered,
    each bad one a 400 with its one-line reason, no backend process restarted."""
    processes = stub_pids(server)
    bad = list(decoder_regressions().values())
    for fmt, seed in sorted(format_seeds().items()):
        bad += mutations(seed, seed=len(fmt), count=12)[::4]
    good = [good_png(i % 5) for i in range(120)]
    work = [(True, g) for g in good] + [(False, b) for b in bad]
    np.random.default_rng(0).shuffle(work)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda item: (item[0], *infer(server, item[1])), work))
    good_failed = [(status, text) for ok, status, text in answers if ok and status != 200]
    assert good_failed == [], f"{len(good_failed)} of {len(good)} good requests failed: {good_failed[:3]}"
    for ok, status, text in answers:
        if not ok and status != 200:  # a mutation may leave a decodable image
            assert status == 400, text
            _assert_clean(json.loads(text)["error"])
    assert sum(1 for ok, status, _ in answers if not ok and status == 400) >= len(decoder_regressions())
    assert server.is_ready() and stub_pids(server) == processes


@pytest.mark.slow
def test_thin_images_are_refused_at_once_and_nobody_waits(server):
    """8 x 100000 and 8 x 250000 pixel PNGs (6-15 KB; decoded and resized to the shorter side they
    took 8-21 s and gigabytes): refused from their header in well under a second, while ordinary
    requests go on unhurt and the server's memory does not move."""
    load = GoodLoad(server)
    idle = tree_memory(server.process.pid)
    peak = Peak(server.process.pid)
    peak.start()
    load.start()
    try:
        thin = [thin_png(8, 100_000), thin_png(250_000, 8)] * 4
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda blob: (time.monotonic(), *infer(server, blob), time.monotonic()), thin))
    finally:
        good = load.stop()
        top = peak.stop()
    for start, status, text, end in answers:
        assert status == 400 and "aspect ratio" in text, text
        assert end - start < 5.0, f"refused only after {end - start:.1f} s"
    assert good and all(status == 200 for status, _, _ in good), [r for r in good if r[0] != 200][:3]
    assert top["pss_mb"] - idle["pss_mb"] < 150, (idle, top)
    assert server.is_ready()


def _binary_request(blob: bytes, size: int, outputs: list[dict] | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary-data request whose header says ``size`` bytes (what tritonclient sends, made wrong at will)."""
    header = {"inputs": [{"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": size}}]}  # fmt: skip
    if outputs is not None:
        header["outputs"] = outputs
    text = json.dumps(header).encode()
    return text + len(blob).to_bytes(4, "little") + blob, {"Inference-Header-Content-Length": str(len(text))}


def _json_request(image_input: dict) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", **image_input}]}).encode(), {}


# Client mistakes that Triton 2.51's HTTP front end answers with 500, not 400: it fails to read the request
# before any model sees it (docs/security.md#client-mistakes-triton-answers-with-500).
TRITON_500S = {
    "negative binary_data_size": lambda png: _binary_request(png, -5),
    "classification -1": lambda png: _binary_request(
        png, 4 + len(png), [{"name": "probabilities", "parameters": {"classification": -1}}]
    ),
    "data an object": lambda png: _json_request({"shape": [1, 1], "data": {"image": "x"}}),
    "BYTES data not strings": lambda png: _json_request({"shape": [1, 1], "data": [1]}),
    "shape not an array": lambda png: _json_request({"shape": "1,1", "data": ["x"]}),
    "body not JSON": lambda png: (b"{{{ not json", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", list(TRITON_500S))
def test_client_mistakes_triton_answers_with_500_harm_nobody(server, mistake):
    """Triton's own parsing answers these with 500 (its error, not ours: the request never reaches a
    model); the answer is a one-line message without a traceback or a path, and the server goes on."""
    png = good_png()
    body, headers = TRITON_500S[mistake](png)
    status, text = post(server, body, {"Content-Type": "application/octet-stream", **headers})
    assert status == 500, f"Triton now answers {status}: update docs/security.md ({text})"
    message = json.loads(text)["error"]
    assert message, text
    _assert_clean(message)
    assert infer(server, png)[0] == 200 and server.is_ready()


def camera_jpeg() -> bytes:
    """A 12 MP photo as a phone saves it (sensor noise keeps it at a realistic ~2 MB at quality 92)."""
    pixels = scene(4032, 3024, seed=1).astype(np.int16)
    pixels += np.random.default_rng(0).normal(0, 4, pixels.shape).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.slow
def test_memory_comes_back_after_bursts_of_camera_photos(server):
    """8 bursts of 200 concurrent 12 MP JPEGs (far over capacity: most are refused as overload after
    their upload was read). Before the malloc settings tritonserver grew to 0.6-1.7 GB and kept it.
    Now: every answer is a result or the overload refusal, the server stays ready, the peak is bounded,
    and 10 s later the tree is back within 100 MiB of where it started, besides the python backend's
    shared memory, which keeps its high-water mark: one batch of uploads per preprocessing instance."""
    blob = camera_jpeg()
    body, header_length = infer_body(blob)  # built once, shared by every sender
    headers = {"Inference-Header-Content-Length": str(header_length), "Content-Type": "application/octet-stream"}
    idle = tree_memory(server.process.pid)
    peak = Peak(server.process.pid)
    peak.start()
    counts: dict[int, int] = {}
    try:
        with ThreadPoolExecutor(200) as pool:
            for _ in range(8):
                for status, text in pool.map(lambda _: post(server, body, headers), range(200)):
                    counts[status] = counts.get(status, 0) + 1
                    assert status in (200, 503), text
    finally:
        top = peak.stop()
    time.sleep(10)
    after = tree_memory(server.process.pid)
    print(f"\ncamera bursts ({len(blob) / MIB:.1f} MiB JPEG): {counts}; idle {idle}, peak {top}, 10 s after {after}")
    assert counts.get(200, 0) > 0 and server.is_ready()
    assert top["pss_mb"] - idle["pss_mb"] < 1500, (idle, top)
    # The shared-memory regions keep one batch of uploads (32 x 1.9 MiB per preprocessing instance).
    config = parse_pbtxt((server.repository / "threegnet_preprocess" / "config.pbtxt").read_text())
    batch = config.max_batch_size * len(blob) / MIB
    assert after["shm_mb"] - idle["shm_mb"] < sum(g.count for g in config.instance_group) * batch + 16, (idle, after)
    assert (after["pss_mb"] - after["shm_mb"]) - (idle["pss_mb"] - idle["shm_mb"]) < 100, (idle, after)


def gzip_of_zeros(total: int) -> bytes:
    """A gzip body that inflates to ``total`` zero bytes (about 1/1000 of it on the wire)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(4 * MIB)
    parts = [compressor.compress(block) for _ in range(total // len(block))]
    return b"".join([*parts, compressor.flush()])


def large_post(server: TritonServer, body: bytes | Iterator[bytes], headers: dict[str, str]) -> dict:
    """Send one large body while ordinary requests go on; what it cost the server, then and after."""
    load = GoodLoad(server)
    idle = tree_memory(server.process.pid)
    peak = Peak(server.process.pid)
    peak.start()
    load.start()
    try:
        status, text = post(server, body, {"Content-Type": "application/octet-stream", **headers}, timeout=300)
    finally:
        good = load.stop()
    time.sleep(10)
    top = peak.stop()
    after = tree_memory(server.process.pid)
    print(f"\n{headers}: {status} {text[:120]}; idle {idle}, peak {top}, 10 s after {after}")
    assert good and all(s == 200 for s, _, _ in good), [r for r in good if r[0] != 200][:3]
    assert server.is_ready()
    return {"status": status, "idle": idle, "peak": top, "after": after}


def head_only(server: TritonServer, headers: dict[str, str]) -> tuple[int, str]:
    """A POST whose head announces a body that is never sent: the answer can only come from the headers."""
    lines = ["POST /v2/models/threegnet_image/infer HTTP/1.1", f"Host: {server.http_url}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((server.host, server.http_port), timeout=30) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = conn.makefile("rb").readline().decode()
    return int(status_line.split()[1]), status_line.strip()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Length": str(1024 * MIB)}, 413),
        ({"Content-Length": str(2 * 1024 * MIB + 1)}, 413),  # Triton 2.51 alone aborts on this (SIGABRT)
        ({"Content-Length": str(2**32 + 100)}, 413),  # 100 in HAProxy's 32-bit integers
        ({"Content-Length": "1000", "Content-Encoding": "gzip"}, 415),  # Triton would inflate it
        ({"Content-Length": "1000", "Content-Encoding": "deflate"}, 415),
        ({"Transfer-Encoding": "chunked"}, 411),  # no length to check
    ],
    ids=["1GiB", "2GiB", "4GiB+100", "gzip", "deflate", "chunked"],
)
def test_bodies_triton_cannot_bound_are_refused_on_their_headers(server, headers, status):
    """Before the front (serve/front.py), a 2 GiB body aborted tritonserver and a gzip bomb kept its size
    in memory. Now each is refused on its headers, with ordinary requests going on, the same tritonserver
    serving, and no memory spent."""
    triton = server.process.pid
    load = GoodLoad(server)
    idle = tree_memory(triton)
    load.start()
    try:
        assert head_only(server, headers)[0] == status
    finally:
        good = load.stop()
    after = tree_memory(triton)
    assert good and all(s == 200 for s, _, _ in good), [r for r in good if r[0] != 200][:3]
    assert server.process.poll() is None and server.is_ready()
    assert after["pss_mb"] - idle["pss_mb"] < 32, (idle, after)


@pytest.mark.slow
def test_a_compressed_body_leaves_nothing_behind(server):
    """Triton 2.51 inflates a gzip body itself and never frees it (+256 MiB per 0.3 MB request, measured
    without the front): refused in front of it now, sent whole."""
    cost = large_post(server, gzip_of_zeros(128 * MIB), {"Content-Encoding": "gzip"})
    assert cost["status"] in (415, -1), cost  # -1: the front answered and closed before the upload ended
    assert cost["after"]["pss_mb"] - cost["idle"]["pss_mb"] < 64, cost


def grpc_infer(server: TritonServer, blob: bytes) -> None:
    """One image as bytes over gRPC (tritonclient raises what the server or the front answers)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        image = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([blob], dtype=object).reshape(1, 1))
        client.infer("threegnet_image", [image], client_timeout=120)
    finally:
        client.close()


# What a client sees when the front refuses a message: its own answer (RESOURCE_EXHAUSTED), or, when the
# client is still sending, the reset of the stream that stops the upload (CANCELLED).
GRPC_REFUSED = ("StatusCode.RESOURCE_EXHAUSTED", "StatusCode.CANCELLED")


@pytest.mark.slow
def test_a_grpc_message_over_the_cap_is_refused_before_triton_reads_it(server):
    """Before the front, a 300 MiB image in one gRPC message was read whole (5.9 s), refused by the
    preprocessing model, and left 302 MiB in its shared memory for good. Now the front reads the message's
    length prefix and refuses it: nothing reaches Triton, ordinary requests go on."""
    from tritonclient.utils import InferenceServerException

    load = GoodLoad(server)
    idle = tree_memory(server.process.pid)
    load.start()
    try:
        with pytest.raises(InferenceServerException) as refused:
            grpc_infer(server, good_png() + bytes(300 * MIB))
    finally:
        good = load.stop()
    after = tree_memory(server.process.pid)
    assert refused.value.status() in GRPC_REFUSED, refused.value
    assert good and all(s == 200 for s, _, _ in good), [r for r in good if r[0] != 200][:3]
    assert server.is_ready() and after["shm_mb"] - idle["shm_mb"] < 16, (idle, after)
    assert after["pss_mb"] - idle["pss_mb"] < 64, (idle, after)


@pytest.fixture(scope="module")
def capped(model_repository: Path):
    """A server whose front lets 1 MiB through: the cap's edge, tested with small bodies."""
    with TritonServer.on_free_ports(model_repository, exit_timeout=3, max_request_mb=1) as s:
        yield s


@pytest.mark.slow
def test_the_cap_is_where_the_flag_says_over_http_and_grpc(capped):
    from tritonclient.utils import InferenceServerException

    under, over = good_png(), good_png() + bytes(2 * MIB)  # trailing bytes after the PNG's end are ignored
    assert infer(capped, under)[0] == 200
    # The head only: the front answers on it and closes, and a client still writing the body may see the
    # connection reset before it reads the answer.
    assert head_only(capped, {"Content-Length": str(len(infer_body(over)[0]))})[0] == 413
    grpc_infer(capped, under)
    with pytest.raises(InferenceServerException) as refused:
        grpc_infer(capped, over)
    assert refused.value.status() in GRPC_REFUSED, refused.value
    assert capped.is_ready()


@pytest.mark.slow
def test_a_grpc_call_that_sends_no_message_is_answered_not_held(capped):
    """The front holds a call until its message's length prefix is in; a caller that never sends it is
    answered 408 (Request Timeout) after 10 s, well before its own deadline, not held open."""
    import grpc
    from tritonclient.grpc import service_pb2

    def silence():
        time.sleep(40)
        yield service_pb2.ModelInferRequest(model_name="threegnet_image")

    with grpc.insecure_channel(capped.grpc_url) as channel:
        call = channel.stream_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            call(silence(), timeout=30)
    assert refused.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED, refused.value
    assert "status: 408" in refused.value.details(), refused.value
