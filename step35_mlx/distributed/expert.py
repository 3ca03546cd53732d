"""Expert parallelism: each rank holds a contiguous block of whole routed experts.

Routing runs on every rank; a token's selected experts that a rank does not hold
contribute zero there, and one ``all_sum`` per MoE layer adds the ranks' partial
outputs. Expert matrices stay whole, so no quantization-group limit applies, and the
expert count need not divide by the rank count (the first ``E % N`` ranks hold one
more). Attention, dense MLPs, shared experts, router, embedding and heads are
replicated: no communication besides the one reduction per MoE layer.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..layers.moe import MoE


def expert_range(num_experts: int, ranks: int, rank: int) -> range:
    """The experts rank ``rank`` of ``ranks`` holds (contiguous; sizes differ by at most one)."""
    base, extra = divmod(num_experts, ranks)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class ExpertShardedMoE(nn.Module):
    """A ``MoE`` holding experts ``held`` only; same parameter names, output summed over ``group``."""

    def __init__(self, moe: MoE, held: range, group: mx.distributed.Group):
        super().__init__()
        self.top_k, self.scaling_factor = moe.top_k, moe.scaling_factor
        self.renormalize, self.limit = moe.renormalize, moe.limit
        self.gate = moe.gate
        self.router_bias = moe.router_bias
        for name in ("gate_proj", "up_proj", "down_proj"):
            proj = getattr(moe, name)
            # contiguous: a copy, so a model split in memory frees the experts it no longer holds
            proj.update(tree_map(lambda w: mx.contiguous(w[held.start:held.stop]), proj.parameters()))
            setattr(self, name, proj)
        self.observer = None
        self._start, self._count, self._group = held.start, len(held), group

    route = MoE.route
    experts = MoE.experts

    def __call__(self, x: mx.array) -> mx.array:
        idx, w = self.route(x)
        if self.observer is not None:
            self.observer(idx)
        local = idx - self._start
        held = (local >= 0) & (local < self._count)
        y = self.experts(x, mx.where(held, local, 0))
        w = mx.where(held, w, 0.0)
        y = (y * w[..., None]).sum(axis=-2).astype(x.dtype)
        return mx.distributed.all_sum(y, group=self._group)


def shard_experts(model, group: mx.distributed.Group) -> None:
    """Replace every MoE block (trunk and MTP) by its share of experts for this rank."""
    layers = list(model.layers) + list(model.model.mtp)
    for layer in layers:
        if layer.is_moe:
            held = expert_range(layer.moe.gate.weight.shape[0], group.size(), group.rank())
            layer.moe = ExpertShardedMoE(layer.moe, held, group)
