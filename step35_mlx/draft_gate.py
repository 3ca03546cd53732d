"""Confidence-gated draft length: draft and verify only what the MTP modules are sure of.

Each drafted token costs a pass through its MTP module (on the release ~455 MB at q4 with
its own 128,896-row head) and a verify row, which reads the experts its token routes to
that no other row needed (~7.5 more per MoE layer, ~2.8 GB at q4, against ~6.5 GB for a
whole plain token). A draft that will likely be rejected costs more than it brings. So
drafting stops at the first module whose running product of draft confidences (each the
top probability of the module's draft distribution: for greedy drafts the modules' own estimate
that every draft so far is right) falls below ``min_confidence``;
that draft is dropped and the later modules are not run this step (their committed rows
wait and are absorbed in the next call). Kangaroo (Liu et al. 2024) stops drafting on the
same signal; EAGLE-2 grows its draft tree by it. The decision uses the draft distributions
alone, never the sampled tokens, so verification keeps the output exactly plain decoding's,
greedy or sampled. It costs one
small read after each module that drafts.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .distributed.sync import root_tokens


def draft_confidence(logits: mx.array, q: mx.array | None) -> mx.array:
    """The draft distribution's top probability: ``max(q)`` when sampling, else the softmax of ``logits``
    at its argmax (the greedy draft's own probability).

    A function of the distribution, never of the token drawn from it: whether a sampled draft is
    kept must not depend on which token was drawn, or the output would no longer follow the target
    model (with q = (0.9, 0.1), p = (0.5, 0.5), dropping the 0.1 draws gives 0.55 / 0.45).
    """
    if q is not None:
        return q.max().astype(mx.float32)
    x = logits.astype(mx.float32)
    return mx.exp(x.max() - mx.logsumexp(x))


def confident(model: Any, running: mx.array, min_confidence: float) -> bool:
    """Whether drafting goes on: ``running >= min_confidence``, as rank 0 decides (one read)."""
    keep = (running >= min_confidence).astype(mx.int32)[None]
    return bool(root_tokens(model, keep).item())
