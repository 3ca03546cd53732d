"""Weight bytes read per decode step: the speed proxy for bandwidth-bound decoding.

On Apple GPUs a batch-1 decode step of a large MoE is limited by how many weight
bytes it streams, not by FLOPs. A verify forward of d + 1 rows reads the attention,
dense and shared weights once but the *union* of the experts its rows route to.
These functions count exactly that from the model's own (possibly quantized) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .layers.moe import MoE
from .model import Model


def nbytes(module: nn.Module) -> int:
    """Bytes of every array parameter of ``module`` (packed weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def expert_bytes(moe: MoE) -> int:
    """Bytes of one routed expert (its gate, up and down slices)."""
    routed = sum(nbytes(getattr(moe, n)) for n in ("gate_proj", "up_proj", "down_proj"))
    return routed // moe.router_bias.shape[0]


def trunk_fixed_bytes(model: Model) -> int:
    """Bytes every trunk forward reads regardless of routing: all but routed experts and embeddings."""
    total = nbytes(model.lm_head) + nbytes(model.model.norm)
    for layer in model.layers:
        total += nbytes(layer)
        if layer.is_moe:
            total -= sum(nbytes(getattr(layer.moe, n)) for n in ("gate_proj", "up_proj", "down_proj"))
    return total


def decode_step_bytes(model: Model) -> int:
    """Weight bytes one plain decode step reads: the fixed part and ``top_k`` experts per MoE layer."""
    return trunk_fixed_bytes(model) + sum(l.moe.top_k * expert_bytes(l.moe) for l in model.layers if l.is_moe)


def mtp_module_bytes(model: Model, depth: int) -> int:
    """Bytes one call of MTP module ``depth`` reads, its own output head included."""
    return nbytes(model.model.mtp[depth])


def mtp_draft_bytes(model: Model, depth: int, head_rows: int) -> int:
    """Bytes one drafting call of module ``depth`` reads with a head of ``head_rows`` output rows."""
    out = model.model.mtp[depth].shared_head.output
    full = nbytes(out)
    return nbytes(model.model.mtp[depth]) - full + full * head_rows // model.config.vocab_size


class RoutingRecorder:
    """Context manager that records the experts each MoE layer selects in each forward."""

    def __init__(self, model: Model):
        self.moes = [l.moe for l in model.layers if l.is_moe]
        self.traces: list[list[mx.array]] = [[] for _ in self.moes]

    def __enter__(self) -> "RoutingRecorder":
        for moe, trace in zip(self.moes, self.traces):
            moe.observer = trace.append
        return self

    def __exit__(self, *exc) -> None:
        for moe in self.moes:
            moe.observer = None

    def clear(self) -> None:
        for trace in self.traces:
            trace.clear()

    def routed_bytes(self) -> int:
        """Expert bytes over all recorded forwards: per layer and forward, the union of rows' experts."""
        total = 0
        for moe, trace in zip(self.moes, self.traces):
            per_expert = expert_bytes(moe)
            for idx in trace:
                total += len(set(idx.reshape(-1).tolist())) * per_expert
        return total

    def forwards(self) -> int:
        return len(self.traces[0]) if self.traces else 0


@dataclass
class DecodeCost:
    """Bytes read while generating ``tokens`` tokens (prefill excluded)."""

    tokens: int
    trunk_forwards: int
    mtp_calls: list[int] = field(default_factory=list)
    trunk_fixed: int = 0
    routed: int = 0
    mtp: int = 0

    @property
    def total(self) -> int:
        return self.trunk_fixed + self.routed + self.mtp

    @property
    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)


def decode_cost(model: Model, recorder: RoutingRecorder, tokens: int, trunk_forwards: int,
                mtp_calls_per_module: list[int], mtp_bytes: list[int] | None = None) -> DecodeCost:
    """Combine recorded routing with the fixed parts into bytes read per generated token.

    ``mtp_bytes``: bytes per call of each MTP module when drafting does not read the whole
    module (a reduced draft vocabulary); default :func:`mtp_module_bytes`.
    """
    if mtp_bytes is None:
        mtp_bytes = [mtp_module_bytes(model, k) for k in range(len(mtp_calls_per_module))]
    return DecodeCost(
        tokens=tokens,
        trunk_forwards=trunk_forwards,
        mtp_calls=list(mtp_calls_per_module),
        trunk_fixed=trunk_forwards * trunk_fixed_bytes(model),
        routed=recorder.routed_bytes(),
        mtp=sum(n * b for n, b in zip(mtp_calls_per_module, mtp_bytes)),
    )
