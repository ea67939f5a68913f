"""Matrix square root by coupled Newton-Schulz iterations (iSQRT-COV, Li et al. CVPR 2018).

Only matrix products, so it runs fast on GPUs, traces into a plain ONNX graph (the
loop is unrolled at trace time) and back-propagates without an eigendecomposition.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sqrtm_newton_schulz(a: Tensor, iterations: int = 5) -> Tensor:
    """Approximate square root of a batch of SPD matrices ``a`` of shape ``(B, d, d)``.

    Pre-normalizes by the trace so the iteration converges, runs ``iterations`` full
    Y/Z steps (as the released 3G-Net code does, without iSQRT-COV's final half step)
    and post-compensates by ``sqrt(trace)``. Products that are exact no-ops (``I @ Y``
    in the first step, the last ``Z`` update) are skipped: same numbers, less work.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    d = a.shape[-1]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    trace = (a * eye).sum(dim=(-2, -1)).view(-1, 1, 1)
    y = a / trace
    z = eye
    for step in range(iterations):
        zy = y if step == 0 else torch.matmul(z, y)
        t = 0.5 * (3.0 * eye - zy)
        y = torch.matmul(y, t)
        if step < iterations - 1:
            z = t if step == 0 else torch.matmul(t, z)
    return y * trace.sqrt()
