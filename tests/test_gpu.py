"""The GPU paths: onnxruntime's CUDA provider, the fp16 export, autocast, Triton on a GPU.

CI machines have no GPU, so these are skipped there (conftest says why); they run
wherever one is present, e.g. ``pytest -m gpu`` on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import TINY_CLASSES

from export.precision import half_precision
from export.serving_model import ServingModel
from export.to_onnx import main as export_main
from serve.server import TritonServer
from threegnet_preprocessing import IMAGENET
from training.checkpoint import load_model
from training.model import create_model

pytestmark = pytest.mark.gpu


def cuda_session(path) -> ort.InferenceSession:
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels or PyTorch
    sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    return sess


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """Set BatchNorm's running statistics from a few batches, as training would.

    A random-init ResNet in eval mode has identity BatchNorms, so its activations grow
    block after block until fp16 overflows: a trained model's never do.
    """
    model.cuda().train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 224, 224, device="cuda"))
    return model.eval()


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    torch.manual_seed(0)
    serving = ServingModel(calibrated(create_model("resnet50_3g")).cpu(), IMAGENET).eval()
    from export.onnx_graph import export_onnx

    path = tmp_path_factory.mktemp("gpu") / "r50.onnx"
    export_onnx(serving, path, 224)
    return serving, path


def test_cuda_provider_matches_pytorch(resnet50):
    serving, path = resnet50
    x = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    probs, logits, wmap = cuda_session(path).run(None, {"image": x})
    with torch.no_grad():
        ref = [t.numpy() for t in serving(torch.from_numpy(x))]
    np.testing.assert_allclose(logits, ref[1], rtol=1e-2, atol=1e-2)  # TF32 convolutions allowed
    np.testing.assert_allclose(wmap, ref[2], atol=1e-3)
    assert (probs.argmax(1) == ref[0].argmax(1)).all()


def test_fp16_export_on_cuda_keeps_the_head_accurate(resnet50, tmp_path):
    serving, _ = resnet50
    from export.onnx_graph import export_onnx

    path = tmp_path / "fp16.onnx"
    export_onnx(half_precision(serving), path, 224)
    x = np.random.default_rng(1).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    probs, logits, _ = cuda_session(path).run(None, {"image": x})
    with torch.no_grad():
        ref_probs = serving(torch.from_numpy(x))[0].numpy()
    assert np.isfinite(logits).all()
    assert np.abs(probs - ref_probs).max() < 0.05
    assert np.mean(probs.argmax(1) == ref_probs.argmax(1)) >= 0.75


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda_keeps_the_second_order_part_in_fp32(dtype):
    torch.manual_seed(0)
    model = calibrated(create_model("resnet50_3g", num_classes=10))
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=dtype):
            got = model(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, rtol=0.1, atol=0.1)


def test_triton_serves_the_repository_on_the_gpu(model_repository, tiny_checkpoint):
    loaded = load_model(tiny_checkpoint)
    serving = ServingModel(loaded.model, loaded.preprocessing).eval()
    import tritonclient.grpc as grpcclient

    server = TritonServer.on_free_ports(model_repository, exit_timeout=3)
    with server:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        config = c.get_model_config("threegnet", as_json=True, headers=server.grpc_control_headers)["config"]
        assert config["parameters"]["onnxruntime_device"]["string_value"] == "cuda"
        x = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
        inp = grpcclient.InferInput("image", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        probs = c.infer("threegnet", [inp]).as_numpy("probabilities")
    with torch.no_grad():
        ref = serving(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(probs, ref, atol=1e-3)
    assert len(TINY_CLASSES) == probs.shape[1]


def test_export_cli_on_a_gpu_machine(tiny_checkpoint, tmp_path):
    assert (
        export_main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path), "--precision", "fp16"]) == 0
    )
