"""``python client/predict.py``, run as a user runs it, against the real Triton server of the ``triton`` fixture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import ROOT, TINY_CLASSES, TINY_PREPROCESSING
from photos import photos
from PIL import Image

from serve.server import free_port, port_in_use
from threegnet_preprocessing import Preprocessing, load_and_preprocess

PREDICT = ROOT / "client" / "predict.py"
RESIZE = ("--resize", str(TINY_PREPROCESSING["resize"]))  # a locked server keeps the record private


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREDICT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def json_lines(stdout: str) -> dict[str, dict]:
    records = [json.loads(line) for line in stdout.splitlines()]
    return {r["path"]: r for r in records}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of 6 small images (PNG, JPEG, WebP, BMP; one in a sub-folder) and a text file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, suffix in enumerate([".png", ".jpg", ".webp", ".bmp", ".png", ".jpg"]):
        pixels = rng.integers(0, 256, (72 + 9 * i, 96, 3), dtype=np.uint8)
        pixels[:: 2 + i] = rng.integers(0, 256, 3, dtype=np.uint8)  # stripes: every image scores differently
        path = folder / ("nested" if i == 4 else "") / f"img{i}{suffix}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
    (folder / "README.txt").write_text("not an image, and not picked up from a folder")
    return folder


@pytest.fixture(scope="module")
def expected(model_repository, images) -> dict[str, np.ndarray]:
    """Probabilities of every image from an in-process onnxruntime run of the exported model."""
    session = ort.InferenceSession(str(model_repository / "threegnet" / "1" / "model.onnx"))
    pp = Preprocessing(**TINY_PREPROCESSING)
    paths = sorted(p for p in images.rglob("img*"))
    (probs,) = session.run(["probabilities"], {"image": np.stack([load_and_preprocess(p, pp) for p in paths])})
    return {str(p): row for p, row in zip(paths, probs, strict=True)}


def check_top_k(record: dict, expected: np.ndarray, k: int) -> None:
    top = record["top_k"]
    assert len(top) == k
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert sum(t["probability"] for t in top) <= 1 + 1e-5
    for t in top:
        assert t["label"] == TINY_CLASSES[t["index"]]
        assert t["probability"] == pytest.approx(float(expected[t["index"]]), abs=2e-6)
    assert top[0]["index"] == int(np.argmax(expected))


def test_json_top_k_matches_onnxruntime(triton, images, expected):
    result = predict(str(images), "--json", "--top-k", "3", "--url", triton.grpc_url)
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    assert sorted(records) == sorted(expected)  # every image once, README.txt skipped
    for path, record in records.items():
        assert set(record) == {"path", "top_k"}
        check_top_k(record, expected[path], 3)
    assert "classified 6 of 6 images" in result.stderr and "images/s" in result.stderr


def test_grpc_and_http_agree_and_tensor_agrees_with_bytes(triton, images, expected):
    runs = {
        "grpc": predict(str(images), "--json", "--top-k", "4", "--url", triton.grpc_url),
        "http": predict(str(images), "--json", "--top-k", "4", "--protocol", "http", "--url", triton.http_url),
        "tensor": predict(str(images), "--json", "--top-k", "4", "--url", triton.grpc_url, "--send", "tensor", *RESIZE),
    }
    answers = {}
    for name, result in runs.items():
        assert result.returncode == 0, f"{name}: {result.stderr}"
        records = json_lines(result.stdout)
        for path, record in records.items():
            check_top_k(record, expected[path], 4)
        answers[name] = {p: {t["index"]: t["probability"] for t in r["top_k"]} for p, r in records.items()}
    assert answers["grpc"] == answers["http"]
    for path, probs in answers["tensor"].items():
        assert probs == pytest.approx(answers["grpc"][path], abs=2e-6)


def test_default_url_and_protocol_are_the_documented_ones():
    """With no server on the default ports the error names them (no fixture needed)."""
    if port_in_use("127.0.0.1", 8000) or port_in_use("127.0.0.1", 8001):
        pytest.skip("something listens on the default ports")
    for args, url in (((), "127.0.0.1:8001 (gRPC)"), (("--protocol", "http"), "127.0.0.1:8000 (HTTP)")):
        result = predict(__file__, "--retries", "0", *args)
        assert result.returncode == 2 and url in result.stderr


@pytest.mark.parametrize("batch_size", ["1", "4"])
def test_a_corrupt_file_is_reported_and_the_others_classified(triton, images, expected, tmp_path, batch_size):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(images.glob("img[0-2].*")):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this was a jpeg once")
    result = predict(str(folder), "--json", "--url", triton.grpc_url, "--batch-size", batch_size, "--concurrency", "2")
    assert result.returncode == 1, result.stderr
    records = json_lines(result.stdout)
    assert len(records) == 4
    broken = records.pop(str(folder / "broken.jpg"))
    assert set(broken) == {"path", "error"} and "corrupt or truncated image" in broken["error"]
    for path, record in records.items():
        check_top_k(record, expected[str(images / Path(path).name)], 4)  # top-5 asked, 4 classes
    assert "1 failed" in result.stderr and "Traceback" not in result.stderr


def test_human_output_and_missing_or_non_image_paths(triton, images, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("plain text with an image suffix")
    result = predict(str(images / "img0.png"), str(tmp_path / "missing.jpg"), str(text), "--url", triton.http_url,
                     "--protocol", "http", "--top-k", "2")  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith(str(images / "img0.png")) and line.count("%") == 2
    assert f"{tmp_path / 'missing.jpg'}: error: no such file or folder" in result.stderr
    assert f"{text}: error: in ensemble 'threegnet_image', not an image" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_down_is_one_line_naming_the_url(images, protocol):
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = predict(str(images), "--url", url, "--protocol", protocol, "--retries", "1")
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: cannot reach Triton at") and url in line


def test_a_missing_model_is_named_in_one_line(triton, images):
    result = predict(str(images), "--url", triton.grpc_url, "--model", "resnet_nope")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "'resnet_nope' is not on the server" in line and triton.grpc_url in line


def test_the_tensor_path_on_a_locked_server_asks_for_the_resize(triton, images):
    """The preprocessing record is in the model's config, which a locked server keeps to its operators."""
    result = predict(str(images), "--url", triton.grpc_url, "--send", "tensor")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "keeps its preprocessing record private" in line and "--resize" in line


@pytest.mark.parametrize("send", ["bytes", "tensor"])
def test_the_files_people_upload_are_classified(triton, model_repository, tmp_path, send):
    """A folder of what cameras and screenshots make (tests/photos.py): HEIC, AVIF, 12 MP, progressive
    and CMYK JPEGs, 16-bit and 4 MP PNGs, an EXIF-rotated photo; decoded by the server (bytes) or here."""
    session = ort.InferenceSession(str(model_repository / "threegnet" / "1" / "model.onnx"))
    pp = Preprocessing(**TINY_PREPROCESSING)
    expected = {}
    for photo in photos():
        path = tmp_path / f"{photo.name}{photo.suffix}"
        path.write_bytes(photo.data)
        expected[str(path)] = session.run(["probabilities"], {"image": load_and_preprocess(path, pp)[None]})[0][0]
    resize = RESIZE if send == "tensor" else ()
    result = predict(str(tmp_path), "--json", "--top-k", "2", "--send", send, "--url", triton.grpc_url, *resize)
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    assert sorted(records) == sorted(expected)  # .heic and .avif found in the folder too
    for path, record in records.items():
        check_top_k(record, expected[path], 2)


def names_the_other_port(result: subprocess.CompletedProcess, url: str) -> str:
    assert result.returncode == 2 and result.stdout == "", result.stderr
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("error: cannot ") and url in line
    return line


def test_http_sent_to_the_grpc_port_is_one_error_line(triton, images):
    result = predict(str(images), "--protocol", "http", "--url", triton.grpc_url, "--retries", "0")
    line = names_the_other_port(result, triton.grpc_url)
    assert "the answer is not HTTP" in line and "is it the gRPC port? (--protocol grpc)" in line


def test_grpc_sent_to_the_http_port_is_one_error_line(triton, images):
    names_the_other_port(predict(str(images), "--url", triton.http_url, "--retries", "0"), triton.http_url)


def test_a_url_with_the_protocols_scheme_is_accepted_and_chooses_the_protocol(triton, images):
    for args in (("--url", f"http://{triton.http_url}"), ("--url", f"http://{triton.http_url}/", "--protocol", "http"),
                 ("--url", f"grpc://{triton.grpc_url}")):  # fmt: skip
        result = predict(str(images / "img0.png"), "--json", *args)
        assert result.returncode == 0, (args, result.stderr)
        assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
        assert len(json_lines(result.stdout)) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--url", "http://127.0.0.1:8000", "--protocol", "grpc"), "is an http address but --protocol is grpc"),
        (("--url", "https://127.0.0.1:8000"), "unsupported scheme 'https://'"),
        (("--url", "http://127.0.0.1:8000/v2/models"), "without a path"),
    ],
)
def test_a_url_that_contradicts_the_protocol_is_one_error_line(images, args, message):
    """Refused before any connection (no server needed), with the exit status for bad arguments."""
    result = predict(str(images), *args)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --url ") and message in line
