"""Sampling math as small pure functions: the one definition of the target distribution.

Plain decoding and MTP speculative decoding both draw from ``probs(...)``, so
speculative sampling is exact with respect to the very distribution plain
sampling uses (temperature, top-k, top-p and min-p included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class SamplingParams:
    """Sampler settings; ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Distribution over the last axis after temperature, top-k, top-p and min-p (float32).

    Greedy gives the one-hot argmax. Filters keep ties at their threshold and are
    applied in the order top-k, top-p, min-p, each on the renormalised result of the previous.
    """
    logits = logits.astype(mx.float32)
    V = logits.shape[-1]
    if params.greedy:
        return (mx.arange(V) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
    lp = logits / params.temperature
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    neg_inf = mx.array(-math.inf, mx.float32)
    if 0 < params.top_k < V:
        kth = mx.sort(lp, axis=-1)[..., V - params.top_k : V - params.top_k + 1]
        lp = mx.where(lp >= kth, lp, neg_inf)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    if params.top_p < 1.0:
        desc = -mx.sort(-lp, axis=-1)
        p_desc = mx.exp(desc)
        before = mx.cumsum(p_desc, axis=-1, inclusive=False)  # mass strictly above each sorted entry
        kept = mx.where(before < params.top_p, desc, mx.array(math.inf, mx.float32))
        threshold = mx.min(kept, axis=-1, keepdims=True)
        lp = mx.where(lp >= threshold, lp, neg_inf)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    if params.min_p > 0:
        cut = mx.max(lp, axis=-1, keepdims=True) + math.log(params.min_p)
        lp = mx.where(lp >= cut, lp, neg_inf)
    return mx.softmax(lp, axis=-1)


def sample(p: mx.array, key: mx.array | None = None) -> mx.array:
    """Draw one index per row of the distribution ``p`` (last axis)."""
    return mx.random.categorical(mx.log(p), axis=-1, key=key)


def residual(p: mx.array, q: mx.array) -> mx.array:
    """``normalize(max(p - q, 0))``: where to resample after a rejected draft (Leviathan et al.)."""
    r = mx.maximum(p - q, 0.0)
    total = r.sum(axis=-1, keepdims=True)
    # p == q exactly leaves nothing to resample from; any draw from p is then correct.
    return mx.where(total > 0, r / mx.maximum(total, 1e-30), p)
