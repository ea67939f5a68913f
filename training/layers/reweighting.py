"""One unrolled step of the re-weighted estimator of a generalized-Gaussian covariance.

The robust (generalized-Gaussian) covariance is the fixed point of an iteratively
re-weighted estimate: each position's weight depends on its current fit. 3G-Net
unrolls a few such steps into learned 1x1-conv blocks that predict a per-position
weight in (0, 1) and re-weight the features before covariance pooling.
"""

from __future__ import annotations

from torch import Tensor, nn


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=False)


class ReweightingStage(nn.Module):
    """The released ``AtMp`` block; attribute names match the released checkpoints.

    ``forward(x, z)`` takes the current (re-weighted) features ``x`` and the reduced
    backbone features ``z`` (the same ``z`` for every stage) and returns the new
    features ``w * x`` together with the weight map ``w`` of shape ``(B, 1, H, W)``.
    """

    def __init__(self, dim: int = 256, hidden: int = 64) -> None:
        super().__init__()
        self.map1, self.bn1 = _conv1x1(dim, dim), nn.BatchNorm2d(dim)
        self.map2, self.bn2 = _conv1x1(dim, dim), nn.BatchNorm2d(dim)
        self.map21, self.bn21 = _conv1x1(dim, dim), nn.BatchNorm2d(dim)
        self.map3, self.bn3 = _conv1x1(dim, dim), nn.BatchNorm2d(dim)
        self.map4, self.bn4 = _conv1x1(dim, dim), nn.BatchNorm2d(dim)
        self.atmap1, self.bnat1 = _conv1x1(dim, hidden), nn.BatchNorm2d(hidden)
        self.atmap2 = _conv1x1(hidden, 1)
        self.atmap3 = _conv1x1(1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        a = x
        h = self.bn1(self.map1(x)) * self.bn2(self.map2(x))
        h = self.relu(h + self.bn21(self.map21(z)))
        h = self.relu(self.bn3(self.map3(h))) * self.relu(self.bn4(self.map4(h)))
        w = self.atmap2(self.relu(self.bnat1(self.atmap1(h))))
        w = (w + self.atmap3(w)).sigmoid()
        return w * a, w
