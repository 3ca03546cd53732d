"""The Perception Encoder of Step 3.7 Flash in MLX.

Patch embedding (a 14x14 stride-14 convolution without bias, run as one matmul over
patches), a learned 52x52 position table bilinearly resized to the view's grid, ``ln_pre``,
then pre-norm blocks with fused QKV, 2-D RoPE, LayerScale and quick-GELU MLPs; no final norm.

RoPE uses the raw checkpoint's convention: interleaved pairs ``(2i, 2i+1)`` of each head
rotate together. Pair ``i < head_dim / 4`` turns with the column index, the rest with the
row index (transformers reorders q/k rows to rotate-half at load and gets the same scores).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionConfig


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of a 1-D bilinear resize, ``align_corners=False`` (PyTorch's rule)."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w1 = src - i0
        m[o, i0] += 1.0 - w1
        m[o, i1] += w1
    return m


def rope_angles(rows: int, cols: int, head_dim: int, theta: float) -> np.ndarray:
    """``[rows * cols, head_dim / 2]`` rotation angles, one per interleaved pair, row-major grid."""
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim // 2, 2, dtype=np.float64) / (head_dim // 2))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.reshape(-1, 1), c.reshape(-1, 1)
    assert inv_freq.shape[0] == quarter
    return np.concatenate([c * inv_freq, r * inv_freq], axis=1)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs of ``x`` ``[B, heads, N, D]`` by angles with ``cos``/``sin`` ``[N, D/2]``."""
    shape = x.shape
    x = x.reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(shape)


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        B, N, D = x.shape
        q, k, v = mx.split(self.qkv(x), 3, axis=-1)
        q, k, v = (t.reshape(B, N, self.num_heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = q.shape[-1] ** -0.5
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, N, D))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class VisionBlock(nn.Module):
    """``x + ls_1 * attn(ln_1(x))``, then ``x + ls_2 * mlp(ln_2(x))``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        D = config.hidden_size
        self.ln_1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.ln_2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = VisionAttention(D, config.num_heads)
        self.mlp = VisionMLP(D, config.intermediate_size)
        self.ls_1 = mx.zeros((D,))
        self.ls_2 = mx.zeros((D,))

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.ls_1 * self.attn(self.ln_1(x), cos, sin)
        return x + self.ls_2 * self.mlp(self.ln_2(x))


class VisionEncoder(nn.Module):
    """Pixels ``[B, 3, H, W]`` (normalized, NCHW as the processor returns) -> ``[B, H/14, W/14, D]``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self.patch_embed = nn.Linear(3 * p * p, D, bias=False)
        self.pos_embed = mx.zeros((config.grid * config.grid, D))
        self.ln_pre = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = [VisionBlock(config) for _ in range(config.num_layers)]

    def positions(self, rows: int, cols: int) -> mx.array:
        """The position table resized to ``rows x cols`` (bilinear, as transformers and vLLM do)."""
        g = self.config.grid
        table = self.pos_embed.reshape(g, g, -1)
        if (rows, cols) == (g, g):
            return table.reshape(g * g, -1)
        dt = table.dtype
        rh = mx.array(bilinear_matrix(rows, g).astype(np.float32))
        rw = mx.array(bilinear_matrix(cols, g).astype(np.float32))
        t = mx.einsum("rg,ghd->rhd", rh, table.astype(mx.float32))
        t = mx.einsum("ch,rhd->rcd", rw, t)
        return t.reshape(rows * cols, -1).astype(dt)

    def __call__(self, pixels: mx.array) -> mx.array:
        B, C, H, W = pixels.shape
        p = self.config.patch_size
        rows, cols = H // p, W // p
        x = pixels[:, :, : rows * p, : cols * p].reshape(B, C, rows, p, cols, p)
        x = x.transpose(0, 2, 4, 1, 3, 5).reshape(B, rows * cols, C * p * p)
        x = self.patch_embed(x.astype(self.patch_embed.weight.dtype))
        x = x + self.positions(rows, cols).astype(x.dtype)
        x = self.ln_pre(x)
        ang = rope_angles(rows, cols, self.config.head_dim, self.config.rope_theta)
        cos, sin = mx.array(np.cos(ang).astype(np.float32)), mx.array(np.sin(ang).astype(np.float32))
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x.reshape(B, rows, cols, -1)
