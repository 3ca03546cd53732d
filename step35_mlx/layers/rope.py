"""NeoX-style (rotate-half) partial RoPE with optional llama3 frequency scaling."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def llama3_inv_freqs(rotary_dims: int, base: float, scaling: dict | None) -> list[float]:
    """Inverse frequencies ``f_i = base^(-2i/rotary_dims)``, llama3-scaled when ``scaling`` is given.

    The scaling is computed over the rotary dims (not the head dim), as HF, vLLM and
    mlx-lm do: long wavelengths are divided by ``factor``, short ones kept, the band
    between is interpolated.
    """
    freqs = [base ** (-(2 * i) / rotary_dims) for i in range(rotary_dims // 2)]
    if not scaling:
        return freqs
    factor = float(scaling.get("factor", 1.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = orig / low, orig / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            s = (orig / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return out


class RoPE(nn.Module):
    """Rotates the first ``rotary_dims`` features of ``[B, H, T, D]`` inputs; the rest pass through."""

    def __init__(self, rotary_dims: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.rotary_dims = rotary_dims
        inv = llama3_inv_freqs(rotary_dims, base, scaling)
        # mx.fast.rope takes per-pair periods (1/f); the leading underscore keeps them out of parameters().
        self._periods = mx.array([1.0 / f for f in inv], dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.rotary_dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )
