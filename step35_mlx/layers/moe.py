"""Step 3.5 mixture of experts: sigmoid router with a selection-only bias, fused expert tensors.

Routed experts are stored as one ``[experts, out, in]`` tensor per projection, the
checkpoint's own layout, and run through ``mx.gather_mm`` / ``mx.gather_qmm``.
For prefill (many token-expert pairs) the pairs are sorted by expert first so each
expert's weights are read once per block of rows.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .mlp import clamped_swiglu

SORT_THRESHOLD = 64


class SwitchLinear(nn.Module):
    """Per-expert linear map, weight ``[experts, out, in]``, applied to the experts in ``indices``."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self.weight.swapaxes(-1, -2)
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU GatherMM is float32-only; Metal/CUDA run bf16 directly.
            y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=indices, sorted_indices=sorted_indices)
            return y.astype(x.dtype)
        return mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> "QuantizedSwitchLinear":
        return QuantizedSwitchLinear.from_switch_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """``SwitchLinear`` with weights quantized per output row in groups along the input dim."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size: int, bits: int, mode: str) -> "QuantizedSwitchLinear":
        return cls(layer.weight, group_size, bits, mode)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x, self.weight, self.scales, self.get("biases"),
            rhs_indices=indices, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode,
            sorted_indices=sorted_indices,
        )


def _sort_by_expert(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Flatten token-expert pairs and order them by expert id; returns (x rows, expert ids, inverse order)."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inverse = mx.argsort(order)
    return x.flatten(0, -3)[order // k], flat[order], inverse


@mx.compile
def _select_experts(logits: mx.array, bias: mx.array, top_k: int, scaling: float, renormalize: bool):
    """Sigmoid scores, top-k by biased score, unbiased weights renormalised and scaled (float32).

    Compiled, like mlx-lm's ``moe_gate_select``: the element-wise steps fuse (~7 fewer graph
    nodes per MoE layer and step). Not shapeless: retraced once per new token count.
    """
    scores = mx.sigmoid(logits.astype(mx.float32))
    biased = scores + bias.astype(mx.float32)
    idx = mx.argpartition(-biased, kth=top_k - 1, axis=-1)[..., :top_k]
    w = mx.take_along_axis(scores, idx, axis=-1)
    if renormalize:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return idx, w * scaling


class MoE(nn.Module):
    """Router (``gate``, ``router_bias``) and fused routed experts; HF keys ``model.layers.N.moe.*``."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 scaling_factor: float, renormalize: bool, limit: float):
        super().__init__()
        self.top_k = top_k
        self.scaling_factor = scaling_factor
        self.renormalize = renormalize
        self.limit = limit
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.router_bias = mx.zeros((num_experts,), dtype=mx.float32)
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts)
        # Optional callback given each forward's selected expert ids (see costs.RoutingRecorder).
        self.observer = None

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Top-k expert ids by biased sigmoid score, and their unbiased, renormalised, scaled weights (float32)."""
        logits = self.gate(x.astype(mx.float32))
        return _select_experts(logits, self.router_bias, self.top_k, self.scaling_factor, self.renormalize)

    def experts(self, x: mx.array, indices: mx.array) -> mx.array:
        """Outputs of the selected experts, ``[..., k, hidden]``."""
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= SORT_THRESHOLD
        idx, inverse = indices, None
        if do_sort:
            x, idx, inverse = _sort_by_expert(x, indices)
        h = clamped_swiglu(self.gate_proj(x, idx, do_sort), self.up_proj(x, idx, do_sort), self.limit)
        y = self.down_proj(h, idx, do_sort)
        if do_sort:
            y = y[inverse].reshape(*indices.shape, 1, -1)
        return y.squeeze(-2)

    def route_observed(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """:meth:`route`, reporting the selection to ``observer`` when one is set."""
        idx, w = self.route(x)
        if self.observer is not None:
            self.observer(idx)
        return idx, w

    @staticmethod
    def combine(y: mx.array, w: mx.array, dtype: mx.Dtype) -> mx.array:
        """Weighted sum of the selected experts' outputs ``[..., k, hidden]``."""
        return (y * w[..., None]).sum(axis=-2).astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        idx, w = self.route_observed(x)
        return self.combine(self.experts(x, idx), w, x.dtype)
