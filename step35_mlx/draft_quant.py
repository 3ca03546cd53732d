"""Lower-bit MTP modules for drafting: requantize their weights at load.

MTP modules only ever draft; the trunk verifies every draft with its own weights, so a
coarser copy of a module changes which tokens are proposed (acceptance) but never the
output. Requantizing a module's output head and/or the rest of it (decoder layer and
``eh_proj``) from the checkpoint's 4 bits to 3 or 2 cuts the bytes each drafted token
reads and the modules' memory by about the same factor. The setting comes from the
folder's ``draft.json`` (:mod:`step35_mlx.draft_config`) and the loader applies it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

DRAFT_BITS = (2, 3, 4, 5, 6, 8)


def _nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def requantize_linear(linear: nn.Module, bits: int) -> nn.QuantizedLinear:
    """``linear`` (float, or affine-quantized: dequantized first) as an affine ``bits``-bit layer.

    Keeps the layer's group size (64 for a float layer) and its scales' dtype.
    """
    if bits not in DRAFT_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, DRAFT_BITS))}, got {bits}")
    if isinstance(linear, nn.QuantizedLinear):
        if getattr(linear, "mode", "affine") != "affine":
            raise ValueError(f"cannot requantize a {linear.mode}-quantized layer")
        weight = mx.dequantize(linear.weight, linear.scales, linear.get("biases"), linear.group_size, linear.bits)
        group_size, dtype = linear.group_size, linear.scales.dtype
    elif isinstance(linear, nn.Linear):
        weight, group_size, dtype = linear.weight, 64, linear.weight.dtype
    else:
        raise TypeError(f"cannot requantize {type(linear).__name__}")
    dense = nn.Linear(weight.shape[-1], weight.shape[0], bias="bias" in linear)
    dense.weight = weight
    if "bias" in linear:
        dense.bias = linear.bias
    out = dense.to_quantized(group_size=group_size, bits=bits)
    out.scales = out.scales.astype(dtype)
    out.biases = out.biases.astype(dtype)
    mx.eval(out.parameters())
    return out


def requantize_mtp(model: nn.Module, head_bits: int | None, layer_bits: int | None) -> int:
    """Requantize every MTP module's output head to ``head_bits`` and its other linear layers to
    ``layer_bits`` (``None``: left as they are), in place; returns the bytes saved."""
    saved = 0
    for module in model.model.mtp:
        for name, child in list(module.named_modules()):
            if not name or not isinstance(child, (nn.Linear, nn.QuantizedLinear)):
                continue
            bits = head_bits if name == "shared_head.output" else layer_bits
            if bits is None:
                continue
            new = requantize_linear(child, bits)
            saved += _nbytes(child) - _nbytes(new)
            *path, attr = name.split(".")
            parent = module
            for p in path:
                parent = getattr(parent, p)
            setattr(parent, attr, new)
    return saved
