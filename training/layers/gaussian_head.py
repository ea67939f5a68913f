"""The global generalized-Gaussian head: reduce, re-weight, covariance, square root, vectorize.

It bolts onto any backbone that yields a ``(B, C, H, W)`` map (as fast-MPN-COV's
representation modules do) and returns a ``(B, d(d+1)/2)`` descriptor for a linear
classifier.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from training.layers.covariance import covariance_pool
from training.layers.newton_schulz import sqrtm_newton_schulz
from training.layers.reweighting import ReweightingStage
from training.layers.triangular import TriangularVectorize


def full_precision(device_type: str, only: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """Turn autocast off where it is on (where it runs ``only``, when given).

    What runs in fp32 under low precision is one rule, written on
    :class:`training.model.ThreeGNet` (``FP16_FP32_MODULES``); this is how it is applied.
    """
    if torch.is_autocast_enabled(device_type) and only in (None, torch.get_autocast_dtype(device_type)):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class GlobalGaussianHead(nn.Module):
    """3G-Net head with its knobs as arguments.

    Args:
        in_channels: channels of the backbone map (2048 for ResNet-50).
        dim: reduced dimension ``d`` (256 in the paper); the output has ``d(d+1)/2`` values.
        num_stages: unrolled re-weighting stages (3 = 3G-Net, 0 = iSQRT-COV-style head).
        iterations: Newton-Schulz iterations (5).
        eps: ridge added to the covariance (1e-7).

    Sub-module names (``layer_reduce``, ``layer_reduce_bn``, ``AtMp1``...) are the
    released ones, so the parameters map one-to-one onto released checkpoints.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int = 256,
        num_stages: int = 3,
        iterations: int = 5,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if num_stages < 0:
            raise ValueError(f"num_stages must be >= 0, got {num_stages}")
        self.dim, self.num_stages, self.iterations, self.eps = dim, num_stages, iterations, eps
        self.layer_reduce = nn.Conv2d(in_channels, dim, kernel_size=1, bias=False)
        self.layer_reduce_bn = nn.BatchNorm2d(dim)
        self.layer_reduce_relu = nn.ReLU(inplace=True)
        for i in range(1, num_stages + 1):
            self.add_module(f"AtMp{i}", ReweightingStage(dim))
        self.vectorize = TriangularVectorize(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ResNet's initialization, except for each stage's weight branch, which starts
        from nearly uniform weights near 0.88.

        Kaiming-initialized, the weight branch drives the sigmoid into saturation
        (weights of 0 or 1 at most positions), which all but stops learning on small
        data. With ``atmap2`` at zero every weight would be 1/2 and each stage would
        halve the features: three stages start 8x smaller than none, and the fc learns
        that much slower (docs/training.md). Instead ``atmap3`` starts at zero and
        ``atmap2`` at a constant that puts ``sigmoid`` near 2 on average (the ReLU'd,
        batch-normalized hidden units average ~0.4): the stage starts close to plain
        covariance pooling, unsaturated, and learns to re-weight. Released checkpoints
        overwrite all of this.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages():
            hidden = stage.atmap2.in_channels
            nn.init.constant_(stage.atmap2.weight, 2.0 / (0.4 * hidden))
            nn.init.zeros_(stage.atmap3.weight)

    @property
    def out_features(self) -> int:
        return self.vectorize.out_features

    def stages(self) -> list[ReweightingStage]:
        return [getattr(self, f"AtMp{i}") for i in range(1, self.num_stages + 1)]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns the descriptor and the last stage's weight map (``None`` without stages)."""
        z = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        feats, weights = z, None
        for stage in self.stages():
            feats, weights = stage(feats, z)
        # The second-order part is fp32 under any autocast: the covariance, its trace and the
        # Newton-Schulz products overflow or lose their accuracy in fp16/bf16.
        with full_precision(feats.device.type):
            cov = covariance_pool(feats.float(), self.eps)
            root = sqrtm_newton_schulz(cov, self.iterations)
            return self.vectorize(root), weights
