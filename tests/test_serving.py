"""A real Triton server on the exported repository: protocols, features, bad input, shutdown."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import ROOT, TINY_CLASSES, png, served_batch
from photos import photos
from PIL import Image
from tritonclient.utils import InferenceServerException

from export.triton_config import MAX_BATCH_SIZE, parse_pbtxt
from serve.server import ServerError, TritonServer, free_port
from threegnet_preprocessing import Preprocessing, load_and_preprocess

PP = Preprocessing(resize=73, crop=64)
SERVED_BATCH = served_batch()


@pytest.fixture(scope="module")
def reference(model_repository):
    """In-process onnxruntime on the same file: what the server must reproduce."""
    sess = ort.InferenceSession(str(model_repository / "threegnet" / "1" / "model.onnx"))
    return lambda x: dict(zip(["probabilities", "logits", "weight_map"], sess.run(None, {"image": x}), strict=True))


def client(server: TritonServer, protocol: str):
    module = grpcclient if protocol == "grpc" else httpclient
    return module, module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)


def bytes_input(module, blobs: list[bytes]):
    inp = module.InferInput("image_bytes", [len(blobs), 1], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=object).reshape(-1, 1))
    return inp


def tensor_input(module, x: np.ndarray):
    inp = module.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    return inp


def test_server_and_models_are_ready(triton):
    assert triton.is_ready()
    states = {m["name"]: m["state"] for m in triton.models()}
    names = (
        "threegnet",
        "threegnet_preprocess",
        "threegnet_image",
        "threegnet_classifier",
        "threegnet_image_classifier",
    )
    assert states == dict.fromkeys(names, "READY")
    assert triton.host == "127.0.0.1"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tensors_match_in_process_onnxruntime(triton, reference, protocol):
    module, c = client(triton, protocol)
    x = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    result = c.infer("threegnet", [tensor_input(module, x)])
    ref = reference(x)
    for name in ("probabilities", "logits", "weight_map"):
        np.testing.assert_allclose(result.as_numpy(name), ref[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_image_bytes_match_local_preprocessing(triton, reference, protocol):
    module, c = client(triton, protocol)
    blobs = [png(120, 90, 0), png(64, 64, 1, "JPEG"), png(300, 200, 2, "WEBP"), png(70, 140, 3, "BMP")]
    result = c.infer("threegnet_image", [bytes_input(module, blobs)])  # mixed sizes and formats, one request
    x = np.stack([load_and_preprocess(b, PP) for b in blobs])
    ref = reference(x)
    np.testing.assert_allclose(result.as_numpy("probabilities"), ref["probabilities"], atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("logits"), ref["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_files_people_upload_are_served(triton, reference, protocol):
    """12 MP, progressive and CMYK JPEGs, HEIC, AVIF, 16-bit PNG, a 4 MP screenshot, an EXIF-rotated
    photo (tests/photos.py): each accepted, and answered as the shared decoder decodes it here."""
    module, c = client(triton, protocol)
    for photo in photos():
        result = c.infer("threegnet_image", [bytes_input(module, [photo.data])])
        ref = reference(load_and_preprocess(photo.data, PP)[None])
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), ref["probabilities"], atol=1e-6, err_msg=photo.name
        )


def test_only_requested_outputs_come_back(triton):
    module, c = client(triton, "http")
    result = c.infer("threegnet_image", [bytes_input(module, [png(80, 80)])],
                     outputs=[module.InferRequestedOutput("probabilities")])  # fmt: skip
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classification_extension(triton, reference, protocol):
    module, c = client(triton, protocol)
    blob = png(100, 100, 7)
    out = module.InferRequestedOutput("probabilities", class_count=3)
    result = c.infer("threegnet_image", [bytes_input(module, [blob])], outputs=[out])
    entries = [e.decode().split(":") for e in result.as_numpy("probabilities").reshape(-1)]
    probs = reference(load_and_preprocess(blob, PP)[None])["probabilities"][0]
    expected = np.argsort(-probs)[:3]
    assert [int(e[1]) for e in entries] == list(expected)
    assert [e[2] for e in entries] == [TINY_CLASSES[i] for i in expected]
    np.testing.assert_allclose([float(e[0]) for e in entries], probs[expected], atol=1e-5)


def test_metadata_and_config_endpoints(triton):
    _, c = client(triton, "http")
    meta = c.get_model_metadata("threegnet_image")
    assert meta["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]}]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "logits", "weight_map"}
    config = c.get_model_config("threegnet", headers=triton.control_headers)  # locked: the operators' key
    assert config["parameters"]["image_model"]["string_value"] == "threegnet_image"
    assert c.get_model_metadata("threegnet")["inputs"][0]["datatype"] == "UINT8"
    assert config["parameters"]["session.intra_op.allow_spinning"]["string_value"] == "0"


def test_on_a_cpu_every_model_batches_at_most_the_cpu_cap_and_the_export_keeps_its_own(triton, model_repository):
    """A full queue must not become one batch of seconds on a CPU; the ensembles follow their model."""
    _, c = client(triton, "http")
    for model in ("threegnet", "threegnet_preprocess", "threegnet_image", "threegnet_classifier"):
        config = c.get_model_config(model, headers=triton.control_headers)
        assert config["max_batch_size"] == SERVED_BATCH, model
    warmup = c.get_model_config("threegnet", headers=triton.control_headers)["model_warmup"]
    assert [w["batch_size"] for w in warmup] == [SERVED_BATCH]  # onnxruntime's arena sized at load
    exported = parse_pbtxt((model_repository / "threegnet_image" / "config.pbtxt").read_text())
    assert exported.max_batch_size == MAX_BATCH_SIZE
    images = np.zeros((SERVED_BATCH, PP.crop, PP.crop, 3), np.uint8)
    assert c.infer("threegnet", [tensor_input(httpclient, images)]).as_numpy("probabilities").shape[0] == SERVED_BATCH


def test_the_stand_in_applies_the_configs_onnxruntime_settings(monkeypatch):
    """What the served session is built with: thread counts and every ``session.*`` parameter
    (the stand-in module imported beside a placeholder for the python backend's utilities)."""
    import importlib.util
    import types

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("onnx_standin", ROOT / "serve" / "triton_models" / "onnx_standin.py")
    standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standin)
    params = {"intra_op_thread_count": "3", "session.intra_op.allow_spinning": "0", "arch": "resnet18_3g"}
    options = standin.session_options(params, instances=1)
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration with key: arch"):
        options.get_session_config_entry("arch")  # only session.* keys are onnxruntime's
    shared = standin.session_options({"intra_op_thread_count": "0"}, instances=2)
    assert shared.intra_op_num_threads == max(1, (os.cpu_count() or 1) // 2)


def test_concurrent_clients_are_all_answered_correctly(triton, reference):
    blobs = [png(60 + 7 * i, 90 - 3 * i, seed=i) for i in range(8)]
    expected = reference(np.stack([load_and_preprocess(b, PP) for b in blobs]))["probabilities"]

    def ask(i: int) -> np.ndarray:
        module, c = client(triton, "grpc" if i % 2 else "http")
        return c.infer("threegnet_image", [bytes_input(module, [blobs[i % 8]])]).as_numpy("probabilities")[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(32)))
    for i, probs in enumerate(answers):
        np.testing.assert_allclose(probs, expected[i % 8], atol=1e-6)


def test_metrics_count_inferences(triton):
    def count() -> float:
        text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith('nv_inference_count{model="threegnet_image"')]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    def settled() -> float:
        """Triton records an ensemble's statistics just after it answers: wait for earlier tests' to land."""
        value = count()
        for _ in range(50):
            time.sleep(0.2)
            value, previous = count(), value
            if value == previous:
                return value
        return value

    before = settled()
    module, c = client(triton, "http")
    c.infer("threegnet_image", [bytes_input(module, [png(64, 64), png(80, 70)])])
    assert settled() == before + 2


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx from a few kB
    return buf.getvalue()


BAD_REQUESTS = {
    "corrupt bytes": (lambda m: [bytes_input(m, [png(100, 100)[:200]])], "corrupt or truncated"),
    "not an image": (lambda m: [bytes_input(m, [b"%PDF-1.4 not an image"])], "not an image"),
    "empty bytes": (lambda m: [bytes_input(m, [b""])], "empty input"),
    "1x1 image": (lambda m: [bytes_input(m, [png(1, 1)])], "1x1 pixels"),
    "decompression bomb": (lambda m: [bytes_input(m, [bomb()])], "decompression bomb"),
    "one bad image in a batch": (lambda m: [bytes_input(m, [png(80, 80), b"junk"])], "image 2 of 2: not an image"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(triton, protocol):
    module, c = client(triton, protocol)
    for what, (make, message) in BAD_REQUESTS.items():
        with pytest.raises(InferenceServerException) as info:
            c.infer("threegnet_image", make(module))
        assert message in str(info.value), what
    with pytest.raises(InferenceServerException, match=r"data-type is .FP32., but model .threegnet. expects .UINT8."):
        x = np.zeros((1, 64, 64, 3), dtype=np.float32)
        inp = module.InferInput("image", [1, 64, 64, 3], "FP32")
        inp.set_data_from_numpy(x)
        c.infer("threegnet", [inp])
    with pytest.raises(InferenceServerException, match=r"unexpected shape for input .image."):
        c.infer("threegnet", [tensor_input(module, np.zeros((1, 32, 32, 3), dtype=np.uint8))])
    with pytest.raises(InferenceServerException, match="expected 1 inputs but got 0"):
        c.infer("threegnet_image", [])
    with pytest.raises(InferenceServerException, match=f"batch-size must be <= {SERVED_BATCH}"):
        c.infer("threegnet", [tensor_input(module, np.zeros((SERVED_BATCH + 1, 64, 64, 3), dtype=np.uint8))])
    # ...and the next good request is served.
    good = c.infer("threegnet_image", [bytes_input(module, [png(90, 90)])])
    assert good.as_numpy("probabilities").shape == (1, 4)
    assert triton.is_ready()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_graceful_shutdown_leaves_no_process(model_repository):
    server = TritonServer(model_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with server:
        pgid = server.process.pid
        module, c = client(server, "http")
        c.infer("threegnet_image", [bytes_input(module, [png(64, 64)])])
        c.close()  # an open keep-alive connection would hold the shutdown for the exit timeout
    assert server.process.returncode == 0  # SIGTERM: Triton drained and exited cleanly
    assert not group_alive(pgid)  # nor are its python backend stubs left behind


def launch(repo: Path, *extra: str) -> tuple[subprocess.Popen, list[int]]:
    ports = [free_port(), free_port(), free_port()]
    cmd = [sys.executable, str(ROOT / "serve" / "launch.py"), "--model-repository", str(repo), "--quiet"]
    cmd += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    cmd += ["--supervisor-metrics-port", str(free_port()), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT), ports


@pytest.mark.slow
def test_launcher_serves_prints_urls_and_stops_on_ctrl_c(model_repository):
    proc, ports = launch(model_repository)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "Ctrl-C to stop." in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(timeout=120), "".join(lines)
        c = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        assert c.is_model_ready("threegnet_image")
        c.close()  # no open connection to wait for: the stop is immediate and clean
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert f"HTTP     http://127.0.0.1:{ports[0]}" in err and f"gRPC     127.0.0.1:{ports[1]}" in err
    assert "Triton stopped." in err
    assert children and not any(group_alive(int(pid)) for pid in children)


@pytest.mark.slow
def test_launcher_fails_clearly_on_a_busy_port(model_repository, triton):
    result = subprocess.run(
        [sys.executable, str(ROOT / "serve" / "launch.py"), "--model-repository", str(model_repository),
         "--http-port", str(triton.http_port), "--supervisor-metrics-port", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"HTTP port {triton.http_port} on 127.0.0.1 is already in use" in result.stderr


@pytest.mark.slow
def test_launcher_shows_tritons_reason_when_a_model_fails_to_load(model_repository, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    (repo / "threegnet" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    proc, _ = launch(repo)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "failed to load 'threegnet'" in err and "Traceback" not in err


def test_server_refuses_a_missing_repository(tmp_path):
    with pytest.raises(ServerError, match="no such model repository"):
        TritonServer(tmp_path / "nope").start()
    with pytest.raises(ServerError, match=r"no model with a config\.pbtxt"):
        TritonServer(tmp_path).start()


def test_the_exported_repository_is_left_untouched(triton, model_repository):
    """Serving runs from a shadow of links: no __pycache__ or anything else lands in the export."""
    module, c = client(triton, "http")
    c.infer("threegnet_image", [bytes_input(module, [png(70, 70)])])
    assert not list(model_repository.rglob("__pycache__"))
    assert all(not p.is_symlink() for p in model_repository.rglob("*"))
