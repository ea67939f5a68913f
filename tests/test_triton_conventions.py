"""Triton's conventions, checked against a real server, so that Triton's stock example clients
(``image_client.py``, ``ensemble_image_client.py`` from triton-inference-server/client) run on
the exported repository unchanged: the checks below are the ones those clients make."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import TINY_CLASSES, png

from threegnet_preprocessing import Preprocessing, load_and_preprocess

PP = Preprocessing(resize=73, crop=64)


def clients(triton):
    return [(grpcclient, grpcclient.InferenceServerClient(triton.grpc_url)),
            (httpclient, httpclient.InferenceServerClient(triton.http_url))]  # fmt: skip


def labelled(entries: np.ndarray) -> list[tuple[float, int, str]]:
    """Classification strings as the stock clients split them: probability, index, label."""
    out = []
    for entry in entries.reshape(-1):
        parts = (entry.decode() if isinstance(entry, bytes) else str(entry)).split(":")
        assert len(parts) == 3, f"{entry!r}: no label (the stock clients print cls[2])"
        out.append((float(parts[0]), int(parts[1]), parts[2]))
    return out


def test_the_tensor_classifier_is_what_image_client_accepts(triton):
    http = httpclient.InferenceServerClient(triton.http_url)
    # The stock clients read model configs: the operators' key (or a launcher started with --public model-config).
    keyed = triton.control_headers
    meta = http.get_model_metadata("threegnet_classifier")
    config = http.get_model_config("threegnet_classifier", headers=keyed)
    assert len(meta["inputs"]) == 1 and len(meta["outputs"]) == 1 and len(config["input"]) == 1
    output = meta["outputs"][0]
    assert output["datatype"] == "FP32" and output["shape"] == [-1, len(TINY_CLASSES)]  # a vector per image
    assert config["output"][0]["label_filename"] == "labels.txt"
    assert meta["inputs"][0]["datatype"] == "UINT8" and meta["inputs"][0]["shape"] == [-1, 64, 64, 3]
    assert config["input"][0]["format"] == "FORMAT_NHWC" and config["max_batch_size"] > 0
    # The raw model itself declares its layout too, and every classification output is labelled.
    raw = http.get_model_config("threegnet", headers=keyed)
    assert raw["input"][0]["format"] == "FORMAT_NHWC"
    assert {o["name"] for o in raw["output"] if o.get("label_filename")} == {"probabilities", "logits"}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_tensor_classifier_classifies_like_the_raw_model(triton, protocol):
    module, c = dict(zip(["grpc", "http"], clients(triton), strict=True))[protocol]
    x = np.random.default_rng(4).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    inp = module.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    top = c.infer("threegnet_classifier", [inp], outputs=[module.InferRequestedOutput("probabilities", class_count=2)])
    raw = c.infer("threegnet", [inp]).as_numpy("probabilities")
    rows = top.as_numpy("probabilities").reshape(2, 2)
    for row, probs in zip(rows, raw, strict=True):
        got = labelled(row)
        assert [i for _, i, _ in got] == list(np.argsort(-probs)[:2])
        assert [label for _, _, label in got] == [TINY_CLASSES[i] for _, i, _ in got]
        np.testing.assert_allclose([p for p, _, _ in got], np.sort(probs)[::-1][:2], atol=1e-5)


def test_the_bytes_classifier_is_what_ensemble_image_client_accepts(triton):
    for module, c in clients(triton):
        meta = c.get_model_metadata("threegnet_image_classifier")
        keyed = triton.grpc_control_headers if module is grpcclient else triton.control_headers
        config = c.get_model_config("threegnet_image_classifier", headers=keyed)
        if module is grpcclient:
            meta = {"inputs": [{"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in meta.inputs],
                    "outputs": [{"name": o.name} for o in meta.outputs]}  # fmt: skip
            config = {"input": list(config.config.input)}
        assert len(meta["inputs"]) == 1 and len(config["input"]) == 1
        assert meta["inputs"][0]["datatype"] == "BYTES" and meta["inputs"][0]["shape"] == [-1, 1]
        # The client asks for a classification of every output the model declares: each must carry labels.
        blobs = [png(90, 70, seed=1), png(64, 64, seed=2, fmt="JPEG")]
        data = np.stack([np.array([b], dtype=bytes) for b in blobs])  # as the stock client builds it: [batch, 1]
        inp = module.InferInput(meta["inputs"][0]["name"], list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        names = [o["name"] for o in meta["outputs"]]
        outputs = [module.InferRequestedOutput(n, class_count=3) for n in names]
        result = c.infer("threegnet_image_classifier", [inp], outputs=outputs)
        probs = c.infer(
            "threegnet",
            [_tensor(module, np.stack([load_and_preprocess(b, PP) for b in blobs]))],
        ).as_numpy("probabilities")
        for name in names:
            rows = result.as_numpy(name).reshape(2, 3)
            for row, p in zip(rows, probs, strict=True):
                assert [i for _, i, _ in labelled(row)] == list(np.argsort(-p)[:3])


def _tensor(module, x: np.ndarray):
    inp = module.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    return inp


def test_the_client_library_resolves_the_classifiers_to_the_model(triton):
    from client.inference import TritonClassifier

    for name in ("threegnet_classifier", "threegnet_image_classifier"):
        info = TritonClassifier(triton.grpc_url, "grpc", model=name).describe()
        assert info.name == "threegnet" and info.image_model == "threegnet_image" and info.has_weight_map
