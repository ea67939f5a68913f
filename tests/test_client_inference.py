"""The client library (client/inference.py) against the real Triton server of the ``triton`` fixture."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
from helpers import ROOT, TINY_CLASSES, TINY_PREPROCESSING, served_batch
from PIL import Image

from client.inference import (
    ModelUnavailable,
    RequestFailed,
    ServerUnreachable,
    TritonClassifier,
    parse_classes,
)
from serve.server import free_port
from threegnet_preprocessing import Preprocessing, load_and_preprocess

PP = Preprocessing(**TINY_PREPROCESSING)


def encoded(seed: int, size: tuple[int, int] = (90, 120), fmt: str = "PNG") -> bytes:
    """A striped noise image, different for every seed, as encoded bytes."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels[:, :: 2 + seed % 5] = rng.integers(0, 256, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference(model_repository):
    """The exported model run in-process by onnxruntime: (probabilities, weight maps) for encoded images."""
    session = ort.InferenceSession(str(model_repository / "threegnet" / "1" / "model.onnx"))

    def run(images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        batch = np.stack([load_and_preprocess(data, PP) for data in images])
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": batch}), strict=True))
        return outputs["probabilities"], outputs["weight_map"]

    return run


@pytest.fixture(params=["grpc", "http"])
def classifier(request, triton) -> TritonClassifier:
    url = triton.grpc_url if request.param == "grpc" else triton.http_url
    return TritonClassifier(url, request.param)


def test_parse_classes_sorts_and_keeps_colons_in_labels():
    parsed = parse_classes([b"0.25:3:a:b", b"0.5:1:c", "0.25:0:d"])
    assert [(p.index, p.label, p.probability) for p in parsed] == [(1, "c", 0.5), (0, "d", 0.25), (3, "a:b", 0.25)]


def test_a_locked_server_is_described_from_its_metadata_alone(classifier):
    """The launcher keeps configs to its operators: what a client learns comes from the open metadata."""
    info = classifier.describe()
    assert (info.name, info.image_model, info.version) == ("threegnet", "threegnet_image", "1")
    assert (info.num_classes, info.input_size) == (4, PP.crop)
    assert (info.tensor_input, info.bytes_input, info.classes_output) == ("image", "image_bytes", "probabilities")
    assert info.has_weight_map
    assert (info.arch, info.max_batch_size, info.preprocessing) == ("", 0, None)  # in the config: private


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_with_the_operators_key_the_config_adds_the_preprocessing_and_batch_size(triton, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    info = TritonClassifier(url, protocol, control_key=triton.lock.control_key).describe()
    assert (info.arch, info.num_classes, info.max_batch_size) == ("resnet18_3g", 4, served_batch())
    assert info.preprocessing == PP


def test_a_batch_larger_than_the_server_takes_is_sent_in_parts(classifier, reference):
    """A locked config hides the limit (a CPU server's is smaller than the export's): the refusal names it."""
    assert classifier.describe().max_batch_size == 0  # no key: the limit comes from the refusal
    limit = served_batch()
    images = [encoded(seed) for seed in range(2 * limit + 1)]
    expected, _ = reference(images)
    for answers in (
        classifier.classify_bytes(images, top_k=1),
        classifier.classify_tensors(np.stack([load_and_preprocess(d, PP) for d in images]), top_k=1),
    ):
        assert [a.top_k[0].index for a in answers] == list(expected.argmax(axis=1))


def test_naming_the_ensemble_finds_the_tensor_model(triton):
    info = TritonClassifier(triton.grpc_url, model="threegnet_image").describe()
    assert (info.name, info.image_model) == ("threegnet", "threegnet_image")


def test_bytes_and_tensors_match_onnxruntime(classifier, reference):
    images = [encoded(seed) for seed in range(3)] + [encoded(7, (70, 200), "JPEG")]
    expected, _ = reference(images)
    for answers in (
        classifier.classify_bytes(images, top_k=10),
        classifier.classify_tensors(np.stack([load_and_preprocess(d, PP) for d in images]), top_k=10),
    ):
        assert len(answers) == len(images)
        for answer, probs in zip(answers, expected, strict=True):
            assert len(answer.top_k) == 4  # top_k is clipped to the number of classes
            assert [p.probability for p in answer.top_k] == sorted((p.probability for p in answer.top_k), reverse=True)
            for p in answer.top_k:
                assert p.label == TINY_CLASSES[p.index]
                assert p.probability == pytest.approx(probs[p.index], abs=2e-6)
            assert answer.weight_map is None  # not asked for


def test_weight_map_only_when_asked(classifier, reference):
    image = encoded(3)
    _, expected_maps = reference([image])
    (answer,) = classifier.classify_bytes([image], top_k=2, weight_map=True)
    assert len(answer.top_k) == 2
    assert answer.weight_map.shape == (4, 4)  # crop 64 / 16
    np.testing.assert_allclose(answer.weight_map, expected_maps[0], atol=1e-6)


def test_a_bad_image_fails_its_request_with_the_server_message(classifier):
    with pytest.raises(RequestFailed, match=r"threegnet_image.*not an image"):
        classifier.classify_bytes([b"this is text, not a picture"])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_missing_model_is_named_with_the_server(triton, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with pytest.raises(ModelUnavailable) as e:
        TritonClassifier(url, protocol, model="resnet_nope").describe()
    message = str(e.value)
    assert "'resnet_nope' is not on the server" in message and url in message


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_is_retried_with_backoff_then_named(protocol):
    url = f"127.0.0.1:{free_port()}"
    classifier = TritonClassifier(url, protocol, retries=2, backoff=0.1)
    started = time.perf_counter()
    with pytest.raises(ServerUnreachable, match=re.escape(f"cannot reach Triton at {url}")) as error:
        classifier.describe()
    assert "3 attempts" in str(error.value)
    # Two retries after 0.1 s and 0.2 s backoff, each jittered to between half and all of it.
    assert time.perf_counter() - started >= (0.1 + 0.2) / 2
    delays = [[classifier.retry_delay(a) for _ in range(200)] for a in range(3)]
    for attempt, samples in enumerate(delays):
        full = 0.1 * 2**attempt
        assert full / 2 <= min(samples) < max(samples) <= full  # jittered, never identical
    health = classifier.health()
    assert not health.live and url in health.error


def test_health_reports_the_server_version(classifier):
    health = classifier.health()
    assert health.live and health.ready and health.version and not health.error


def test_concurrent_requests_from_threads(classifier, reference):
    images = [encoded(seed) for seed in range(8)]
    expected, _ = reference(images)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda data: classifier.classify_bytes([data], top_k=1)[0], images))
    for answer, probs in zip(answers, expected, strict=True):
        assert answer.top_k[0].index == int(np.argmax(probs))


def test_client_code_never_imports_torch():
    """Client machines need no torch: not directly, not through training/ or export/; of serve/ only the
    stdlib-only facts of the served protocol (endpoints, the key headers)."""
    code = (
        "import sys, client.predict, client.demo; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'export', 'serve') "
        "and m not in ('serve', 'serve.endpoints', 'serve.control')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_model_that_vanished_after_discovery_is_unavailable_not_a_bad_image(classifier):
    """Triton answers "unknown model" while a model unloads: every request fails, not one image."""
    stale = dataclasses.replace(classifier.describe(), image_model="threegnet_unloaded")
    classifier._info = stale  # as if discovered before the model went away
    with pytest.raises(ModelUnavailable, match="unknown model: 'threegnet_unloaded'"):
        classifier.classify_bytes([encoded(0)])
    assert classifier.describe().image_model == "threegnet_image"  # discovery runs again afterwards
