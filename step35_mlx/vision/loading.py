"""Attach the vision tower of a Step 3.7 checkpoint to the text model at load time."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .config import VisionConfig
from .tower import VisionTower
from .weights import is_vision_key, to_internal


def split_vision(raw: dict[str, mx.array], keep: bool = True) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """``(text tensors, vision tensors)``; vision ones renamed and re-laid-out for :class:`VisionTower`.

    ``keep=False`` drops the vision tensors unread (text-only load, or no ``vision_config``).
    """
    text, vision = {}, {}
    for k, v in raw.items():
        if not is_vision_key(k):
            text[k] = v
        elif keep:
            name, v = to_internal(k, v)
            vision[name] = v
    return text, vision


def attach_vision(model: Any, config: dict[str, Any], vision_weights: dict[str, mx.array]) -> bool:
    """Give ``model`` a ``vision`` tower when ``config`` has a vision config and the tensors exist.

    Returns whether a tower was attached; a step3p7 config whose checkpoint lacks the vision
    tensors (a text-only export) loads as a text model.
    """
    vcfg = VisionConfig.from_config(config)
    if vcfg is None or not vision_weights:
        return False
    model.vision = VisionTower(vcfg)
    model.image_token_id = vcfg.image_token_id
    return True
