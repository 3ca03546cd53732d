"""SwiGLU feed-forward with Step's optional clamp (dense layers, shared expert, MTP layers)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    """``silu(gate) * up``; with ``limit > 0``, silu(gate) is clamped from above and up to [-limit, limit]."""
    act = nn.silu(gate)
    if limit > 0:
        act = mx.minimum(act, limit)
        up = mx.clip(up, -limit, limit)
    return act * up


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, limit: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.limit = limit

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))
