"""3G-Net: a ResNet backbone (layer4 at stride 1) with a global generalized-Gaussian head.

Builders carry the released names (``resnet50_3g`` ...) and produce state dicts whose
keys and shapes are those of the authors' checkpoints, so those load with
``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from training.layers import GlobalGaussianHead, full_precision

# arch name -> (block, blocks per stage)
ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18_3g": (BasicBlock, (2, 2, 2, 2)),
    "resnet23_3g": (Bottleneck, (1, 2, 2, 2)),
    "resnet34_3g": (BasicBlock, (3, 4, 6, 3)),
    "resnet50_3g": (Bottleneck, (3, 4, 6, 3)),
    "resnet101_3g": (Bottleneck, (3, 4, 23, 3)),
    "resnet152_3g": (Bottleneck, (3, 8, 36, 3)),
}

_HEAD = "head."


class ThreeGNet(ResNet):
    """torchvision's ResNet with layer4 at stride 1 and a :class:`GlobalGaussianHead`.

    The head is a sub-module of its own (``self.head``), but the released checkpoints
    keep its parameters at the top level (``layer_reduce.weight``, ``AtMp1.map1.weight``);
    two state-dict hooks translate, so ``state_dict()`` and ``load_state_dict()`` speak
    the released names while the code stays composable.

    What stays fp32 under low precision is decided here, for training under autocast
    (``--amp``) and for the fp16 export alike: the head's second-order part (covariance,
    trace, Newton-Schulz, vectorization) under any autocast, inside
    :class:`GlobalGaussianHead`, since in fp16 or bf16 the trace overflows and the
    iterations lose their accuracy; and in fp16 the whole head and the fc
    (:attr:`FP16_FP32_MODULES`), since the re-weighting stages' products overflow fp16 too
    (measured with ``--amp fp16``: NaN descriptors on 3 of 400 val images after one
    epoch, with the backbone's output below 111). bf16 has fp32's range and needs only
    the first. The head is about 3% of ResNet50-3G's work in training, ~8% of its FLOPs
    in the export.
    """

    #: Modules kept in fp32 when the backbone runs in fp16: under fp16 autocast
    #: (:meth:`forward_with_weights`) and in the fp16 export (:meth:`half_backbone`).
    FP16_FP32_MODULES: tuple[str, ...] = ("head", "fc")

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        num_stages: int = 3,
        dim: int = 256,
        iterations: int = 5,
    ) -> None:
        super().__init__(block, list(layers), num_classes=num_classes)
        # Rebuild layer4 at stride 1: a 224 input gives a 14x14 map (M = 196 positions).
        self.inplanes = 256 * block.expansion
        self.layer4 = self._make_layer(block, 512, layers[3], stride=1)
        del self.avgpool, self.fc  # re-added after the head, as in the released key order
        self.head = GlobalGaussianHead(512 * block.expansion, dim, num_stages, iterations)
        self.fc = nn.Linear(self.head.out_features, num_classes)
        for m in self.layer4.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.register_state_dict_post_hook(_flatten_head_keys)
        self.register_load_state_dict_pre_hook(_nest_head_keys)

    def forward_features(self, x: Tensor) -> Tensor:
        """The backbone map ``(B, 512 * expansion, H/16, W/16)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits and the last re-weighting stage's per-position weights ``(B, 1, h, w)``."""
        features = self.forward_features(x)
        # FP16_FP32_MODULES (the head and the fc) run outside fp16 autocast, and an fp16 backbone
        # (half_backbone) feeds them in their own dtype.
        with full_precision(x.device.type, only=torch.float16):
            descriptor, weights = self.head(features.to(self.head.layer_reduce.weight.dtype))
            return self.fc(descriptor), weights

    def half_backbone(self) -> ThreeGNet:
        """Cast to fp16 in place, all but :attr:`FP16_FP32_MODULES` (the fp16 export)."""
        self.half()
        for name in self.FP16_FP32_MODULES:
            getattr(self, name).float()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_weights(x)[0]


def _flatten_head_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """``head.layer_reduce.weight`` -> ``layer_reduce.weight``, keeping the key order."""
    nested = prefix + _HEAD
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[prefix + key[len(nested) :] if key.startswith(nested) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k.startswith(nested)]:
            metadata[prefix + key[len(nested) :]] = metadata.pop(key)


def _nest_head_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """The inverse of :func:`_flatten_head_keys`, applied before loading."""
    head_children = tuple(name for name, _ in module.head.named_children())
    for key in list(state_dict):
        rest = key[len(prefix) :]
        if key.startswith(prefix) and rest.split(".", 1)[0] in head_children:
            state_dict[prefix + _HEAD + rest] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in list(metadata):
            rest = key[len(prefix) :]
            if key.startswith(prefix) and rest.split(".", 1)[0] in head_children:
                metadata[prefix + _HEAD + rest] = metadata.pop(key)


def _builder(arch: str) -> Callable[..., ThreeGNet]:
    block, layers = ARCHS[arch]

    def build(num_classes: int = 1000, **kwargs: Any) -> ThreeGNet:
        return ThreeGNet(block, layers, num_classes=num_classes, **kwargs)

    build.__name__ = arch
    build.__doc__ = (
        f"3G-Net on a {block.__name__} ResNet with {list(layers)} blocks per stage. "
        "Keyword arguments (num_stages, dim, iterations) go to :class:`ThreeGNet`."
    )
    return build


resnet18_3g = _builder("resnet18_3g")
resnet23_3g = _builder("resnet23_3g")
resnet34_3g = _builder("resnet34_3g")
resnet50_3g = _builder("resnet50_3g")
resnet101_3g = _builder("resnet101_3g")
resnet152_3g = _builder("resnet152_3g")


def create_model(arch: str, num_classes: int = 1000, **kwargs: Any) -> ThreeGNet:
    """Build a 3G-Net by name; an unknown name lists the known ones."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    return globals()[arch](num_classes=num_classes, **kwargs)


def infer_config(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """Arch, class count and head knobs of a 3G-Net state dict (released keys, no prefix).

    Raises ``ValueError`` when the keys are not those of a 3G-Net.
    """
    if "fc.weight" not in state_dict or "layer_reduce.weight" not in state_dict:
        raise ValueError("not a 3G-Net state dict (no fc.weight / layer_reduce.weight)")
    bottleneck = "layer1.0.conv3.weight" in state_dict
    counts = []
    for stage in range(1, 5):
        ids = {k.split(".")[1] for k in state_dict if k.startswith(f"layer{stage}.")}
        counts.append(len(ids))
    block = Bottleneck if bottleneck else BasicBlock
    arch = next((name for name, spec in ARCHS.items() if spec == (block, tuple(counts))), None)
    if arch is None:
        raise ValueError(f"no known arch has {block.__name__} blocks {counts}")
    num_stages = len({k.split(".")[0] for k in state_dict if k.startswith("AtMp")})
    return {
        "arch": arch,
        "num_classes": int(state_dict["fc.weight"].shape[0]),
        "num_stages": num_stages,
        "dim": int(state_dict["layer_reduce.weight"].shape[0]),
    }


__all__ = [
    "ARCHS",
    "ThreeGNet",
    "create_model",
    "infer_config",
    "resnet18_3g",
    "resnet23_3g",
    "resnet34_3g",
    "resnet50_3g",
    "resnet101_3g",
    "resnet152_3g",
]
