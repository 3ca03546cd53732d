"""SwiGLU feed-forward with Step's optional clamp (dense layers, shared expert, MTP layers)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@partial(mx.compile, shapeless=True)
def _clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    return mx.minimum(nn.silu(gate), limit) * mx.clip(up, -limit, limit)


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    """``silu(gate) * up``; with ``limit > 0``, silu(gate) is clamped from above and up to [-limit, limit].

    Compiled (shapeless, as mlx-lm does): one fused node instead of 2-5 per call.
    """
    return _clamped_swiglu(gate, up, limit) if limit > 0 else _swiglu(gate, up)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, limit: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.limit = limit

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))
