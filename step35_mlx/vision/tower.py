"""The vision tower (encoder + projector) and per-image feature extraction."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig
from .encoder import VisionEncoder
from .processor import ProcessedImage
from .projector import Projector


class VisionTower(nn.Module):
    """``tower(pixels [B, 3, S, S])`` -> text-space image tokens ``[B, (S/56)^2, text_hidden]``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.encoder = VisionEncoder(config)
        self.projector = Projector(config)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.projector(self.encoder(pixels))

    def image_features(self, image: ProcessedImage, dtype: mx.Dtype | None = None) -> mx.array:
        """All tokens of one image, ``[n, text_hidden]``: each crop's tokens row-major, then the global view's."""
        dtype = dtype or self.encoder.patch_embed.weight.dtype
        if dtype not in (mx.float32, mx.float16, mx.bfloat16):
            dtype = mx.float32
        parts = []
        if image.num_crops:
            crops = self(mx.array(image.crops).astype(dtype))
            parts.append(crops.reshape(-1, crops.shape[-1]))
        parts.append(self(mx.array(image.global_view[None]).astype(dtype))[0])
        return mx.concatenate(parts, axis=0)
