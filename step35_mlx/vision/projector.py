"""Vision-to-text projector: two 3x3 stride-2 convolutions (no activation between) and a linear map.

The convolutions run as im2col + ``nn.Linear`` with weights ``[out, in * 3 * 3]``: the
checkpoint's ``[out, in, 3, 3]`` reshaped, no transpose, so ``nn.quantize`` treats them like
any other linear layer and the converter copies them as they are.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig


def im2col_3x3_s2(x: mx.array) -> mx.array:
    """``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), C * 9]``: 3x3 windows of a stride-2, pad-1 conv, ``(c, kh, kw)`` order."""
    B, H, W, C = x.shape
    Ho, Wo = (H + 1) // 2, (W + 1) // 2
    x = mx.pad(x, [(0, 0), (1, 2 * Ho - H), (1, 2 * Wo - W), (0, 0)])
    taps = [x[:, i : i + 2 * Ho - 1 : 2, j : j + 2 * Wo - 1 : 2, :] for i in range(3) for j in range(3)]
    return mx.stack(taps, axis=-1).reshape(B, Ho, Wo, C * 9)


class StridedConv(nn.Module):
    """A 3x3, stride-2, padding-1 convolution with bias, stored as a linear layer."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = nn.Linear(9 * c_in, c_out, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(im2col_3x3_s2(x))


class Projector(nn.Module):
    """Encoder grid ``[B, h, w, D]`` -> text-space tokens ``[B, ceil(h/4) * ceil(w/4), text_hidden]``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        D = config.hidden_size
        self.down1 = StridedConv(D, 2 * D)
        self.down2 = StridedConv(2 * D, 4 * D)
        self.proj = nn.Linear(4 * D, config.text_hidden_size, bias=config.projector_bias)

    def __call__(self, grid: mx.array) -> mx.array:
        x = self.down2(self.down1(grid))
        B, h, w, C = x.shape
        return self.proj(x.reshape(B, h * w, C))
