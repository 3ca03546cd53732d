"""Pipeline parallelism: each rank runs a contiguous range of trunk layers.

Rank 0 embeds the tokens and runs the first layers, sends its activations to rank 1
with ``mx.distributed.send``, and so on; the last stage's hidden state is shared with
every rank by one ``all_sum`` (the other ranks add zeros), so every rank computes the
same logits and MTP drafts. Embedding, final norm, LM head and MTP modules are held
by every rank. Stages run one after another: this pools memory, it does not add speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..model import Model


@dataclass(frozen=True)
class Stage:
    """Trunk layers ``[first, last)`` of rank ``rank`` out of ``ranks``."""

    rank: int
    ranks: int
    first: int
    last: int


def split_layers(num_layers: int, weights: list[float]) -> list[int]:
    """Layer counts proportional to ``weights`` (e.g. each host's usable memory), at least one each, summing to ``num_layers``."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError("pipeline weights must be positive")
    if len(weights) > num_layers:
        raise ValueError(f"{len(weights)} pipeline stages for {num_layers} layers: at most one stage per layer")
    total = sum(weights)
    exact = [num_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) < num_layers:
        i = max(range(len(counts)), key=lambda j: exact[j] - counts[j])
        counts[i] += 1
    while sum(counts) > num_layers:
        i = max((j for j in range(len(counts)) if counts[j] > 1), key=lambda j: counts[j] - exact[j])
        counts[i] -= 1
    return counts


def split_by_memory(layer_bytes: list[int], capacity: list[float], shared: int = 0) -> list[int]:
    """Contiguous stages whose layer bytes follow each rank's room (``capacity`` minus the ``shared``
    bytes every rank holds): stage i ends at the layer where the running total comes closest to its
    cumulative share. At least one layer per stage."""
    n, L = len(capacity), len(layer_bytes)
    if n > L:
        raise ValueError(f"{n} pipeline stages for {L} layers: at most one stage per layer")
    room = [max(c - shared, 1.0) for c in capacity]
    total, cum, counts, first = sum(layer_bytes), 0.0, [], 0
    for i in range(n - 1):
        target = total * sum(room[: i + 1]) / sum(room)
        last = first + 1  # this stage ends before layer `last`
        acc = cum + layer_bytes[first]
        while last < L - (n - 1 - i) and abs(acc + layer_bytes[last] - target) <= abs(acc - target):
            acc += layer_bytes[last]
            last += 1
        counts.append(last - first)
        cum, first = acc, last
    counts.append(L - first)
    return counts


def parse_split(text: str, num_layers: int, ranks: int) -> list[int]:
    """``"30,15"`` -> ``[30, 15]``; checks one positive count per rank summing to ``num_layers``."""
    try:
        counts = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"--split {text!r}: expected comma-separated layer counts such as 30,15") from None
    if len(counts) != ranks:
        raise ValueError(f"--split {text!r} has {len(counts)} stages but there are {ranks} ranks")
    if any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise ValueError(f"--split {text!r}: each stage needs >= 1 layer and they must sum to {num_layers}")
    return counts


def stages(counts: list[int]) -> list[Stage]:
    out, first = [], 0
    for r, c in enumerate(counts):
        out.append(Stage(r, len(counts), first, first + c))
        first += c
    return out


class PipelineModel(Model):
    """A ``Model`` holding only its stage's trunk layers; ``forward_hidden`` passes activations between ranks."""

    def __init__(self, model: Model, stage: Stage, group: mx.distributed.Group):
        nn.Module.__init__(self)  # not Model.__init__: that would build a second, full trunk
        self.config = model.config
        self.model = model.model
        self.lm_head = model.lm_head
        self.mtp_hidden = model.mtp_hidden
        self.model.layers = self.model.layers[stage.first:stage.last]
        self.stage = stage
        self._group = group

    def _act_dtype(self) -> mx.Dtype:
        emb = self.model.embed_tokens
        return emb.scales.dtype if "scales" in emb else emb.weight.dtype

    def trunk(self, tokens: mx.array, cache: list | None = None,
              input_embeddings: mx.array | None = None) -> mx.array:
        """This stage's layers between a ``recv`` from the previous rank and a ``send`` to the next;
        returns the last stage's hidden state on every rank (evaluated). ``input_embeddings`` (image
        features merged in) replace the token embeddings on the first stage."""
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries; this stage has {len(self.layers)} layers")
        B, T = tokens.shape
        s, g = self.stage, self._group
        # The stages' graphs differ, so collectives are ordered by hand: the tokens (which may come
        # from rank 0's token all_sum) first, then recv/send, then the hidden state's all_sum.
        mx.eval(tokens)
        if s.rank == 0:
            h = self.model.embed_tokens(tokens) if input_embeddings is None else input_embeddings
        else:
            h = mx.distributed.recv((B, T, self.config.hidden_size), self._act_dtype(), s.rank - 1, group=g)
        full_mask, sliding_mask = self._masks(T, cache)
        for i, layer in enumerate(self.layers):
            h = layer(h, sliding_mask if layer.is_sliding else full_mask, cache[i] if cache else None)
        if s.rank < s.ranks - 1:
            h = mx.depends(mx.zeros_like(h), mx.distributed.send(h, s.rank + 1, group=g))
        # Evaluated step by step so every rank runs its recv/send before the all_sum starts (the ring
        # backend shares the neighbour sockets between them) and even when the caller only evaluates
        # the caches (prefill), which would otherwise leave the next stage waiting forever.
        mx.eval(h)
        out = mx.distributed.all_sum(h, group=g)
        mx.eval(out)
        return out


def shard_pipeline(model: Model, group: mx.distributed.Group, counts: list[int]) -> PipelineModel:
    """``model`` cut to this rank's stage of ``counts`` layers per rank."""
    if len(counts) != group.size() or sum(counts) != model.config.num_hidden_layers:
        raise ValueError(f"pipeline split {counts} does not match {group.size()} ranks and "
                         f"{model.config.num_hidden_layers} layers")
    return PipelineModel(model, stages(counts)[group.rank()], group)
