"""Zero-centred RMSNorm, the only norm Step 3.5 uses.

Checkpoints store ``w`` centred at 0 and the model multiplies by ``1 + w``.
This module is the single place where the ``+1`` is applied: weights stay in
the checkpoint's zero-centred form in every file we read or write, and the
shift happens here, in float32, at run time (like the reference HF code).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class ZeroCenteredRMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.zeros((dims,), dtype=mx.float32)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)
