"""``python client/predict.py DIR --evaluate``: accuracy through the server, checked against onnxruntime.

A small 3G-Net is trained on the built-in textures (as tests/test_train.py does), exported and served
by a real Triton whose model configs are public; it is evaluated on its own held-out images. The
tensor path must score exactly what onnxruntime scores on the same crops, and so must the bytes path:
the images are small PNGs and JPEGs, which the server's fast decoding decodes at full scale. onnxruntime
in turn ranks every crop as the checkpoint does in PyTorch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import ROOT
from PIL import Image

from client import predict
from client.inference import TritonClassifier
from serve.server import TritonServer, free_port
from threegnet_preprocessing import IMAGE_SUFFIXES, Preprocessing, load_and_preprocess
from training.synthetic import generate
from training.train import main as train_main

PREDICT = ROOT / "client" / "predict.py"
TRAIN = [
    "--arch", "resnet18_3g", "--dim", "16", "--batch-size", "6", "--lr", "0.05", "--image-size", "32",
    "--resize", "36", "--workers", "0", "--no-progress", "--epochs", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Iterator[dict]:
    """Data (6 classes, 6 held-out images each), the best checkpoint, its export, and a server with public configs."""
    root = tmp_path_factory.mktemp("evaluate")
    data = generate(root / "data", classes=6, per_class=8, val_per_class=6, size=48, progress=False)
    for png in sorted((data / "val").rglob("*.png"))[::3]:  # JPEGs too: small ones decode at full scale
        Image.open(png).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    torch.manual_seed(0)
    assert train_main([str(data), *TRAIN, "--output-dir", str(root / "run")]) == 0
    checkpoint = root / "run" / "model_best.pth.tar"
    from export.to_onnx import main as export_main

    repo = root / "repo"
    assert export_main(["--checkpoint", str(checkpoint), "--output-dir", str(repo)]) == 0
    server = TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), exit_timeout=3,
        public=("model-config",),
    )  # fmt: skip
    with server:
        yield {"val": data / "val", "checkpoint": checkpoint, "repo": repo, "server": server}


def expected_scores(trained: dict) -> dict[str, float]:
    """Top-1 and top-5 (percent) of the exported model in onnxruntime on the crops the server makes."""
    session = ort.InferenceSession(str(trained["repo"] / "threegnet" / "1" / "model.onnx"))
    labels = (trained["repo"] / "threegnet" / "labels.txt").read_text().splitlines()
    pp = Preprocessing(resize=36, crop=32)
    files = sorted(p for p in trained["val"].rglob("*") if p.suffix in IMAGE_SUFFIXES)
    truth = np.array([labels.index(p.parent.name) for p in files])
    (probs,) = session.run(["probabilities"], {"image": np.stack([load_and_preprocess(p, pp) for p in files])})
    top5 = np.argsort(-probs, axis=1)[:, :5]
    assert len(files) == 36
    return {
        "top1": round(100.0 * float(np.mean(top5[:, 0] == truth)), 4),
        "top5": round(100.0 * float(np.mean((top5 == truth[:, None]).any(axis=1))), 4),
    }


def test_onnxruntime_and_pytorch_rank_every_held_out_crop_alike(trained):
    """The reference above is the checkpoint's own computation: PyTorch, on the same uint8 crops, ranks
    each image's top class as the exported graph does (near-ties of under 1e-4 aside)."""
    from export.serving_model import ServingModel
    from training.checkpoint import load_model

    pp = Preprocessing(resize=36, crop=32)
    files = sorted(p for p in trained["val"].rglob("*") if p.suffix in IMAGE_SUFFIXES)
    crops = np.stack([load_and_preprocess(p, pp) for p in files])
    with torch.no_grad():
        reference = ServingModel(load_model(trained["checkpoint"]).model, pp)(torch.from_numpy(crops))[0].numpy()
    session = ort.InferenceSession(str(trained["repo"] / "threegnet" / "1" / "model.onnx"))
    (exported,) = session.run(["probabilities"], {"image": crops})
    top2 = np.sort(reference, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.sum() >= len(files) - 2, "too many near-ties to compare"
    assert (reference.argmax(1) == exported.argmax(1))[clear].all()
    np.testing.assert_allclose(exported, reference, atol=1e-4)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREDICT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_both_wire_paths_score_what_onnxruntime_scores(trained):
    server = trained["server"]
    result = run_cli(str(trained["val"]), "--evaluate", "--json", "--url", server.grpc_url)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = expected_scores(trained)
    assert report["images"] == 36 and report["classes"] == 6 and report["num_classes"] == 6
    for path in ("bytes", "tensor"):
        score = report["scores"][path]
        assert score["images"] == 36 and score["failed"] == 0
        assert {k: score[k] for k in ("top1", "top5")} == expected, path

    # What the export records of the checkpoint's accuracy, the report shows; or it says it is not recorded.
    metrics = torch.load(trained["checkpoint"], weights_only=True)["metrics"]
    config = TritonClassifier(server.grpc_url, control_key=server.lock.control_key)._config("threegnet")
    if report["recorded"] is None:
        assert report["recorded_note"] == "not recorded in the export"
        assert not {"val_top1", "metrics", "checkpoint_metrics", "validation"} & set(config.get("parameters", {}))
    else:
        assert report["recorded"]["val_top1"] == pytest.approx(metrics["val_top1"])
    # Training evaluated the same held-out images in PyTorch, with the served decoding: the same top-1,
    # give or take an image that sits on a near-tie between PyTorch and onnxruntime.
    assert abs(metrics["val_top1"] - expected["top1"]) <= 100.0 / 36 + 1e-6

    text = run_cli(str(trained["val"]), "--evaluate", "--url", server.http_url, "--protocol", "http")
    assert text.returncode == 0, text.stderr
    assert f"top-1 {expected['top1']:6.2f}%" in text.stdout and "evaluated 36 images of 6 classes" in text.stdout
    assert "bytes " in text.stdout and "tensor " in text.stdout


def test_a_folder_that_names_no_label_is_one_line_and_status_2(trained, tmp_path):
    folder = tmp_path / "val"
    some = sorted(trained["val"].rglob("*.png"))[0]
    for name in ("zebra", some.parent.name):  # one misspelt class beside a real one
        (folder / name).mkdir(parents=True)
        (folder / name / "a.png").write_bytes(some.read_bytes())
    result = run_cli(str(folder), "--evaluate", "--url", trained["server"].grpc_url)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: class folder 'zebra' in {folder} matches no label of the model (its labels: ")
    assert some.parent.name in line
    assert result.stdout == ""


def test_on_a_locked_server_the_tensor_path_needs_resize_and_the_record_is_private(trained, monkeypatch, capsys):
    """A server that keeps configs to its operators (as the launcher's default does): the bytes path alone,
    said so; with --resize both paths; the recorded accuracy is 'not recorded'."""
    monkeypatch.setattr(TritonClassifier, "_config", lambda self, name: None)
    url = trained["server"].grpc_url
    assert predict.main([str(trained["val"]), "--evaluate", "--json", "--url", url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["scores"]) == ["bytes"] and report["scores"]["bytes"]["images"] == 36
    assert any("tensor path not evaluated" in n and "--resize" in n for n in report["notes"])
    assert report["recorded"] is None and "private" in report["recorded_note"]

    assert predict.main([str(trained["val"]), "--evaluate", "--json", "--url", url, "--resize", "36"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = expected_scores(trained)
    assert {p: {k: s[k] for k in ("top1", "top5")} for p, s in report["scores"].items()} == {
        "bytes": expected,
        "tensor": expected,
    }


def test_a_recorded_accuracy_is_shown_beside_the_measured_one(trained, monkeypatch, capsys):
    """The checkpoint's metrics record, as an export may put it in the config's parameters."""
    real = TritonClassifier._config
    metrics = torch.load(trained["checkpoint"], weights_only=True)["metrics"]

    def with_record(self: TritonClassifier, name: str) -> dict | None:
        config = real(self, name)
        config.setdefault("parameters", {})["metrics"] = {"string_value": json.dumps(metrics)}
        return config

    monkeypatch.setattr(TritonClassifier, "_config", with_record)
    assert predict.main([str(trained["val"]), "--evaluate", "--url", trained["server"].grpc_url]) == 0
    out = capsys.readouterr().out
    assert f"recorded (checkpoint, validation)    top-1 {metrics['val_top1']:6.2f}%" in out
    assert f"(epoch {metrics['epoch']:g})" in out


def test_evaluate_takes_one_existing_folder(tmp_path, capsys):
    assert predict.main([str(tmp_path / "missing"), "--evaluate"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert predict.main([str(tmp_path), str(tmp_path), "--evaluate"]) == 2
    assert "takes one folder" in capsys.readouterr().err
    assert predict.main([str(tmp_path), "--evaluate"]) == 2
    assert "no class folders" in capsys.readouterr().err
