"""Step 3.5 attention: GQA with per-head q/k norm, partial RoPE and a head-wise sigmoid gate.

Full and sliding layers share this module; they differ only in head counts, RoPE
settings and the cache/mask the model hands in (see ``config.LayerSpec``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..cache import Mask
from ..config import LayerSpec
from .norms import ZeroCenteredRMSNorm
from .rope import RoPE

# Chunks of more than this many rows attend over a quantized cache by dequantizing its keys
# and values once and running the fused kernel: quantized_sdpa materialises heads x rows x
# keys scores (51 GB for a 512-token chunk at 256K context in Step 3.5 Flash, against 1 GiB
# for one layer's dequantized K/V). Decode and MTP-verify rows keep the quantized matmuls.
# step35_mlx.plan.activations reads this constant.
DEQUANTIZE_PREFILL_ROWS = 16


def quantized_sdpa(q: mx.array, k: tuple, v: tuple, scale: float, mask: Mask, group_size: int, bits: int) -> mx.array:
    """Attention over a quantized KV cache (``(packed, scales, biases)`` keys/values), GQA-aware."""
    B, Hq, T, D = q.shape
    Hkv = k[0].shape[1]
    L = k[0].shape[2]
    q = (q * scale).reshape(B, Hkv, Hq // Hkv, T, D)
    kq = [a[:, :, None] for a in k]
    vq = [a[:, :, None] for a in v]
    scores = mx.quantized_matmul(q, *kq, transpose=True, group_size=group_size, bits=bits)
    if isinstance(mask, str):
        mask = mx.arange(L)[None, :] <= mx.arange(L - T, L)[:, None]
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
    out = mx.quantized_matmul(weights, *vq, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, Hq, T, D)


class Attention(nn.Module):
    side_stream = None  # streams.SideStream: K, V, the gate and half of Q and O beside the rest

    def __init__(self, hidden_size: int, spec: LayerSpec, eps: float, gated: bool = True):
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, spec.num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, spec.num_kv_heads * spec.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, spec.num_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, hidden_size, bias=False)
        self.q_norm = ZeroCenteredRMSNorm(spec.head_dim, eps)
        self.k_norm = ZeroCenteredRMSNorm(spec.head_dim, eps)
        self.gated = gated
        if gated:
            self.g_proj = nn.Linear(hidden_size, spec.num_heads, bias=False)
        self.rope = RoPE(spec.rotary_dims, spec.rope_theta, spec.rope_scaling)
        # Absolute position of the first row, minus the cache offset. MTP module k sets k + 1:
        # its row t embeds token t + k + 1 and sits at that token's position.
        self.position_shift = 0

    def __call__(self, x: mx.array, mask: Mask = None, cache: Any = None) -> mx.array:
        B, T, _ = x.shape
        offset = (cache.offset if cache is not None else 0) + self.position_shift
        # with two CPU streams (step35_mlx.streams), K, V and the gate are computed beside Q
        with mx.stream(self.side_stream.get()) if self.side_stream is not None else nullcontext():
            k = self.k_norm(self.k_proj(x).reshape(B, T, self.num_kv_heads, -1)).transpose(0, 2, 1, 3)
            k = self.rope(k, offset=offset)
            v = self.v_proj(x).reshape(B, T, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
            gate = mx.sigmoid(self.g_proj(x))[..., None] if self.gated else None
        q = self.q_proj(x) if self.side_stream is None else self.side_stream.linear(self.q_proj, x)
        q = self.rope(self.q_norm(q.reshape(B, T, self.num_heads, -1)).transpose(0, 2, 1, 3), offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if isinstance(k, tuple) and T > DEQUANTIZE_PREFILL_ROWS:
            k = mx.dequantize(*k, group_size=cache.group_size, bits=cache.bits)
            v = mx.dequantize(*v, group_size=cache.group_size, bits=cache.bits)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        elif isinstance(k, tuple):
            out = quantized_sdpa(q, k, v, self.scale, mask, cache.group_size, cache.bits)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3)
        if gate is not None:
            out = out * gate
        out = out.reshape(B, T, -1)
        return self.o_proj(out) if self.side_stream is None else self.side_stream.linear(self.o_proj, out)
