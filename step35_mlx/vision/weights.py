"""Map Step 3.7 vision tensors from the checkpoint's names and layouts to the MLX tower's.

Raw keys live under ``vision_model.`` or ``model.vision_model.`` (projector
``vit_large_projector.weight``, possibly under ``model.``). The mapping is idempotent:
names already under ``vision.`` (our converted folders) pass through unchanged.
Layout changes: the patch convolution ``[D, 3, 14, 14]`` becomes a linear ``[D, 588]``;
the 3x3 downsampler convolutions ``[out, in, 3, 3]`` become linears ``[out, in * 9]``. Both
are plain reshapes (same bytes). q/k rows keep the checkpoint's interleaved RoPE order.
"""

from __future__ import annotations

import re

import mlx.core as mx

ENCODER_PREFIXES = ("model.vision_model.", "vision_model.")
PROJECTOR_KEYS = ("model.vit_large_projector.weight", "vit_large_projector.weight",
                  "model.multi_modal_projector.weight")
INTERNAL_PREFIX = "vision."

_RENAMES = (
    (re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$"), r"encoder.layers.\1.attn.qkv.weight"),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_bias$"), r"encoder.layers.\1.attn.qkv.bias"),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.ls_([12])\.gamma$"), r"encoder.layers.\1.ls_\2"),
    (re.compile(r"^transformer\.resblocks\.(\d+)\.(.*)$"), r"encoder.layers.\1.\2"),
    (re.compile(r"^conv1\.weight$"), "encoder.patch_embed.weight"),
    (re.compile(r"^positional_embedding$"), "encoder.pos_embed"),
    (re.compile(r"^ln_pre\.(.*)$"), r"encoder.ln_pre.\1"),
    (re.compile(r"^vit_downsampler([12])\.(weight|bias)$"), r"projector.down\1.linear.\2"),
)


def is_vision_key(key: str) -> bool:
    """True for any vision-tower or projector tensor, raw or already converted."""
    return key.startswith(ENCODER_PREFIXES + (INTERNAL_PREFIX,)) or key in PROJECTOR_KEYS


def to_internal(key: str, value: mx.array) -> tuple[str, mx.array]:
    """``(name, tensor)`` in the MLX tower's naming and layout for one vision checkpoint tensor."""
    name = internal_name(key)
    if value.ndim == 4:
        value = value.reshape(value.shape[0], -1)
    return name, value


def internal_name(key: str) -> str:
    """The internal name of a vision checkpoint key (no tensor needed)."""
    if key.startswith(INTERNAL_PREFIX):
        return key
    if key in PROJECTOR_KEYS:
        return INTERNAL_PREFIX + "projector.proj.weight"
    rest = next(key[len(p):] for p in ENCODER_PREFIXES if key.startswith(p))
    for pattern, repl in _RENAMES:
        if pattern.match(rest):
            return INTERNAL_PREFIX + pattern.sub(repl, rest)
    raise KeyError(f"unknown vision tensor {key}")
