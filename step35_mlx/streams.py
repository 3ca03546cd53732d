"""Two streams on the CPU device: independent parts of a decode step run on both cores.

MLX's CPU backend runs each stream's work on its own thread, one op at a time, so a
batch-1 decode step keeps one core busy. In a MoE layer three pieces of work are
independent: the first half of the selected experts, the second half, and the shared
expert. With two streams the second half and the shared expert go to a side stream while
the main stream runs the first half; the expert outputs are concatenated back in their
routed order and summed exactly as in the one-stream path, so results are bit-identical.
Prefill-sized steps (expert-sorted) only move the shared expert.

Never switched on for the GPU (one Metal/CUDA stream already fills the device; not measured
there): :func:`use_two_streams` turns it on for a model, :func:`choose_streams` is the CLI's rule.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .layers.mlp import clamped_swiglu
from .layers.moe import SORT_THRESHOLD


class SideStream:
    """The second CPU stream, one per thread that runs the model: MLX streams belong to the thread that
    made them, and ``serve`` generates on a worker thread, not the one that loaded the model."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Any:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = mx.new_stream(mx.cpu)
        return stream

    def linear(self, linear: nn.Module, x: mx.array) -> mx.array:
        """``linear(x)`` with half its output features on this stream (:func:`split_linear`); lets the
        layers split their projections without importing this module."""
        return split_linear(linear, x, self)


def split_moe_ffn(layer: Any, x: mx.array, side_stream: SideStream) -> mx.array:
    """``layer.moe(x) + layer.share_expert(x)`` over two streams.

    Decode and verify rows: the side stream runs the shared expert's gate and up projections, then
    the second half of the selected experts; the main stream the router, the first half and the
    shared expert's down projection (about equal work). Prefill-sized steps (expert-sorted) only
    move the shared expert.
    """
    side = side_stream.get()
    moe, share = layer.moe, layer.share_expert
    idx, w = moe.route_observed(x)
    if idx.size >= SORT_THRESHOLD or moe.top_k < 2:
        with mx.stream(side):
            shared = share(x)
        return moe.combine(moe.experts(x, idx), w, x.dtype) + shared
    h = moe.top_k // 2
    with mx.stream(side):
        act = clamped_swiglu(share.gate_proj(x), share.up_proj(x), share.limit)
        y_side = moe.experts(x, idx[..., h:])
    y = mx.concatenate([moe.experts(x, idx[..., :h]), y_side], axis=-2)
    return moe.combine(y, w, x.dtype) + share.down_proj(act)


def split_dense_ffn(mlp: nn.Module, x: mx.array, side_stream: SideStream) -> mx.array:
    """A dense layer's ``mlp(x)``: the up projection beside the gate projection, then half the down projection's rows on the side stream."""
    with mx.stream(side_stream.get()):
        up = mlp.up_proj(x)
    return split_linear(mlp.down_proj, clamped_swiglu(mlp.gate_proj(x), up, mlp.limit), side_stream)


def split_linear(linear: nn.Module, x: mx.array, side_stream: SideStream) -> mx.array:
    """``linear(x)`` with the second half of its output features computed on the side stream.

    Only for affine-quantized layers, whose kernel computes every output feature as the same
    dot product whatever rows it is given, so the result is bit-identical (tested); any other
    layer runs whole on the current stream.
    """
    if not isinstance(linear, nn.QuantizedLinear) or linear.mode != "affine" or "bias" in linear:
        return linear(x)
    w, scales, biases = linear["weight"], linear["scales"], linear["biases"]
    half = w.shape[0] // 2

    def rows(part: slice) -> mx.array:
        return mx.quantized_matmul(x, w[part], scales=scales[part], biases=biases[part], transpose=True,
                                   group_size=linear.group_size, bits=linear.bits)

    with mx.stream(side_stream.get()):
        upper = rows(slice(half, None))
    return mx.concatenate([rows(slice(0, half)), upper], axis=-1)


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Weights one decode step reads below which the default stays on one stream: the handoffs between
# the streams then cost more than the second core brings (measured on 2 idle cores: the 1.3 MiB demo
# 0.83x, the 101 MiB bench model 1.65x; the release reads ~6.5 GB a token).
MIN_SPLIT_BYTES = 16 * 2**20


def choose_streams(requested: int | None, tuned: int | None = None, step_bytes: int | None = None) -> int:
    """How many CPU streams decode uses: ``requested`` (``--streams``), else what ``tune`` measured
    faster for this model (``tuned``), else 2 on the CPU device with two or more cores when a decode
    step reads at least :data:`MIN_SPLIT_BYTES` of weights (``step_bytes``; None: not known), else 1.

    Always 1 off the CPU device (one Metal/CUDA stream already fills the GPU; not measured there).
    The default does not look at the machine's load: a busy machine is what ``tune`` and
    ``--streams 1`` are for (measured here: with the second core busy, two streams gain nothing).
    """
    on_cpu = mx.default_device() == mx.cpu
    if requested is not None:
        if requested not in (1, 2):
            raise ValueError(f"--streams must be 1 or 2, not {requested}")
        if requested == 2 and not on_cpu:
            raise ValueError("--streams 2 is for the CPU device (one GPU stream already fills the GPU)")
        return requested
    if not on_cpu:
        return 1
    if tuned in (1, 2):
        return tuned
    big_enough = step_bytes is None or step_bytes >= MIN_SPLIT_BYTES
    return 2 if usable_cores() >= 2 and big_enough else 1


def use_two_streams(model: Any, enable: bool = True) -> bool:
    """Split each step's work over two CPU streams (``enable=False`` restores one).

    What runs on the side stream: K, V and the gate of every attention layer, the up projection
    and half the down projection's rows of a dense layer, half the routed experts and the shared
    expert of a MoE layer, half the LM head's rows. Returns whether the split is on: only when the
    default device is the CPU.
    """
    on = enable and mx.default_device() == mx.cpu
    side = SideStream() if on else None
    for layer in list(model.layers) + list(getattr(model.model, "mtp", [])):
        layer.side_stream = side
        layer.self_attn.side_stream = side
    model.head_side_stream = side
    return on
