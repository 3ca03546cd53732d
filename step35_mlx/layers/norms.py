"""Zero-centred RMSNorm, the only norm Step 3.5 uses.

Checkpoints store ``w`` centred at 0 and the model multiplies by ``1 + w``.
This module is the single place where the ``+1`` is applied: weights stay in
the checkpoint's zero-centred form in every file we read or write, and the
shift happens here, in float32, at run time (like the reference HF code).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def _zero_centered_rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``rms_norm(x) * (1 + w)`` in float32; compiled so the shift and casts fuse instead of adding graph nodes."""
    scale = 1.0 + weight.astype(mx.float32)
    return mx.fast.rms_norm(x.astype(mx.float32), scale, eps).astype(x.dtype)


class ZeroCenteredRMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.zeros((dims,), dtype=mx.float32)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return _zero_centered_rms_norm(x, self.weight, self.eps)
