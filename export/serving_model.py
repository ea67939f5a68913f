"""The exact computation that gets exported: raw uint8 images in, probabilities out.

Normalization lives inside the graph so no client can normalize wrongly, and a
uint8 NHWC request is 4x smaller than a float32 one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from threegnet_preprocessing import Preprocessing
from training.model import ThreeGNet


class ServingModel(nn.Module):
    """``image`` ``(B, H, W, 3)`` uint8 RGB, already resized and cropped, to
    ``probabilities`` and ``logits`` ``(B, K)`` and, for models with re-weighting
    stages, ``weight_map`` ``(B, H/16, W/16)``: the last stage's per-position weights.
    """

    def __init__(self, model: ThreeGNet, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
        std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    @property
    def has_weight_map(self) -> bool:
        return self.model.head.num_stages > 0

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        x = image.permute(0, 3, 1, 2).float() * self.scale + self.shift
        x = x.to(self.model.conv1.weight.dtype)  # fp16 models: the backbone runs in half
        logits, weights = self.model.forward_with_weights(x)
        if weights is None:
            return logits.softmax(dim=1), logits
        return logits.softmax(dim=1), logits, weights.squeeze(1).float()
