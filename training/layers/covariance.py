"""Covariance pooling: the second-order statistic at the heart of 3G-Net and iSQRT-COV."""

from __future__ import annotations

import torch
from torch import Tensor


def covariance_pool(x: Tensor, eps: float = 1e-7) -> Tensor:
    """Biased covariance of the spatial positions of a feature map, plus ``eps * I``.

    ``x`` is ``(B, C, H, W)``; the result is ``(B, C, C)``. This is the released
    ``X Ī Xᵀ`` with ``Ī = I/M - 11ᵀ/M²`` written as mean-centring, which gives the same
    numbers without building an ``M x M`` matrix.
    """
    feats = x.flatten(2)  # (B, C, M)
    centred = feats - feats.mean(dim=2, keepdim=True)
    cov = torch.matmul(centred, centred.transpose(1, 2)) / feats.shape[2]
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return cov + eps * eye
