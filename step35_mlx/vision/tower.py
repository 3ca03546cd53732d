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
        """All tokens of one image, ``[n, text_hidden]``: each crop's tokens row-major, then the global view's.

        Views run one at a time (evaluated as they go), so the peak working set is one view's
        (``vision.costs.view_cost``) however many crops an image has.
        """
        dtype = dtype or self.activation_dtype
        parts = []
        for view in list(image.crops) + [image.global_view]:
            out = self(mx.array(view[None]).astype(dtype))[0]
            mx.eval(out)
            parts.append(out)
        return mx.concatenate(parts, axis=0)

    @property
    def activation_dtype(self) -> mx.Dtype:
        """The float dtype the tower computes in: its weights' (the scales' when quantized)."""
        layer = self.projector.proj
        w = getattr(layer, "scales", layer.weight)
        return w.dtype if w.dtype in (mx.float32, mx.float16, mx.bfloat16) else mx.float32
