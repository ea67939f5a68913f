"""Triangular vectorization of symmetric matrices, in the order the released fc expects."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def lower_triangle_index(dim: int) -> Tensor:
    """Flat row-major indices of the lower triangle (i >= j), row by row.

    This is ``torch.ones(d, d).triu().t().reshape(-1).nonzero()`` from the released
    code, computed once here so the traced graph holds a constant Gather index
    instead of Trilu/NonZero.
    """
    rows, cols = torch.tril_indices(dim, dim)
    return rows * dim + cols


class TriangularVectorize(nn.Module):
    """``(B, d, d)`` symmetric matrices to ``(B, d(d+1)/2)`` vectors."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # Not persistent: it is derived from ``dim``, and released state dicts lack it.
        self.register_buffer("index", lower_triangle_index(dim), persistent=False)

    @property
    def out_features(self) -> int:
        return self.dim * (self.dim + 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1).index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_features={self.out_features}"
