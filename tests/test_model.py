"""The model: released names and shapes, builders, shapes of outputs, learning."""

from __future__ import annotations

import pytest
import torch
from helpers import read_reference

from training import model as models
from training.model import ARCHS, create_model, infer_config


@pytest.mark.parametrize("arch", ["resnet18_3g", "resnet50_3g", "resnet101_3g"])
def test_state_dict_keys_and_shapes_equal_the_released_listing(arch):
    expected = read_reference(arch)
    got = [(k, tuple(v.shape)) for k, v in create_model(arch).state_dict().items()]
    assert got == expected


@pytest.mark.parametrize("arch", list(ARCHS))
def test_builders_exist_with_released_names_and_take_num_classes(arch):
    builder = getattr(models, arch)
    m = builder(num_classes=365)
    assert m.fc.out_features == 365
    assert m.fc.in_features == 256 * 257 // 2
    assert infer_config(m.state_dict()) == {"arch": arch, "num_classes": 365, "num_stages": 3, "dim": 256}


def test_resnet50_3g_size_matches_the_paper():
    m = create_model("resnet50_3g")
    n = sum(p.numel() for p in m.parameters())
    assert 57.5e6 < n < 58.5e6  # the paper: about 58.0 M, fc alone 32.9 M
    assert abs(m.fc.weight.numel() + m.fc.bias.numel() - 32.9e6) < 0.1e6


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown arch 'resnet51_3g'; known: resnet18_3g"):
        create_model("resnet51_3g")


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 48), (100, 80), (224, 224)])
def test_any_input_size_giving_a_map_of_at_least_2x2_gives_finite_logits_and_sigmoid_weights(height, width):
    m = create_model("resnet18_3g", num_classes=5, dim=16).eval()
    with torch.no_grad():
        logits, w = m.forward_with_weights(torch.randn(2, 3, height, width))
    assert logits.shape == (2, 5)
    assert w.shape == (2, 1, (height + 15) // 16, (width + 15) // 16)
    assert torch.isfinite(logits).all()
    assert ((w >= 0) & (w <= 1)).all()  # sigmoid weights


def test_layer4_has_stride_one_so_224_px_give_a_14x14_map():
    m = create_model("resnet50_3g", num_classes=3, dim=16).eval()
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 2048, 14, 14)


def test_batch_gives_the_same_outputs_as_its_samples_one_by_one():
    torch.manual_seed(0)
    m = create_model("resnet18_3g", num_classes=7).eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        batched = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_fp16_keeps_the_head_and_fc_in_fp32_under_autocast_and_in_the_half_backbone():
    """The one fp32 rule (``ThreeGNet.FP16_FP32_MODULES``), for training with ``--amp fp16`` and
    the fp16 export; under bf16 only the head's second-order part stays fp32 (tests/test_layers.py)."""
    torch.manual_seed(0)
    m = create_model("resnet18_3g", num_classes=3, dim=16).eval()
    assert m.FP16_FP32_MODULES == ("head", "fc")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        features = m.forward_features(x)
        logits, weights = m.forward_with_weights(x)
    assert features.dtype == torch.float16  # the backbone does run in fp16
    assert logits.dtype == weights.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights = m.forward_with_weights(x)
    assert logits.dtype == weights.dtype == torch.bfloat16  # bf16: the fc and the stages run in bf16
    half = create_model("resnet18_3g", num_classes=3, dim=16).half_backbone()
    for name, p in half.named_parameters():
        assert p.dtype == (torch.float32 if name.split(".")[0] in half.FP16_FP32_MODULES else torch.float16), name


def test_gradients_are_finite_through_the_head():
    torch.manual_seed(0)
    m = create_model("resnet18_3g", num_classes=4, dim=32).train()
    x = torch.randn(4, 3, 48, 48)
    loss = torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    head_grads = [p.grad for n, p in m.named_parameters() if n.startswith("head.")]
    assert head_grads and all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert any(g.abs().sum() > 0 for g in head_grads)


def test_a_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    m = create_model("resnet18_3g", num_classes=4, dim=16).train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
