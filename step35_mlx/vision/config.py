"""The vision side of a Step 3.7 ``config.json``: encoder geometry, projector and image token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    """Perception Encoder + projector hyper-parameters (released: 1536 wide, 47 layers, 16 heads)."""

    hidden_size: int = 1536
    num_layers: int = 47
    num_heads: int = 16
    intermediate_size: int = 8960
    image_size: int = 728
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    text_hidden_size: int = 4096
    projector_bias: bool = False
    image_token_id: int | None = None
    crop_size: int = 504

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Side of the learned position-embedding grid (52 for 728 / 14)."""
        return self.image_size // self.patch_size

    def tokens_per_view(self, side: int) -> int:
        """Image tokens a ``side`` x ``side`` view yields after the two stride-2 convolutions."""
        g = side // self.patch_size
        for _ in range(2):
            g = (g + 1) // 2
        return g * g

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VisionConfig | None":
        """From a full ``config.json`` dict; ``None`` when it has no ``vision_config`` (text-only)."""
        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            return None
        tc = config.get("text_config") or {}
        width = int(vc.get("width", vc.get("hidden_size", 1536)))
        if "mlp_ratio" in vc:
            inter = int(round(width * float(vc["mlp_ratio"])))
        else:
            inter = int(vc.get("intermediate_size", 8960))
        rope = vc.get("rope_parameters") or {}
        return cls(
            hidden_size=width,
            num_layers=int(vc.get("layers", vc.get("num_hidden_layers", 47))),
            num_heads=int(vc.get("heads", vc.get("num_attention_heads", 16))),
            intermediate_size=inter,
            image_size=int(vc.get("image_size", 728)),
            patch_size=int(vc.get("patch_size", 14)),
            layer_norm_eps=float(vc.get("layer_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", vc.get("rope_theta", 10000.0))),
            text_hidden_size=int(tc.get("hidden_size", config.get("hidden_size", 4096))),
            projector_bias=bool(config.get("projector_bias", False)),
            image_token_id=config.get("image_token_id"),
        )
