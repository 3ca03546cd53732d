"""Sampling math as small pure functions: the one definition of the target distribution.

The distribution is "temperature, then top-k, then top-p, then min-p, each filter on
the renormalised result of the previous one, ties at a threshold kept". Every filter is
expressed as one threshold on the temperature-scaled logits (:func:`keep_threshold`), so
plain decoding (:func:`sample_token`, a masked categorical draw, an argmax when greedy) and
MTP speculative decoding (:func:`probs`, the full distribution its acceptance rule needs)
draw from exactly the same distribution.

Work per token at vocab V: greedy is one argmax; top-k is one partial selection
(``mx.topk``), and a top-p / min-p after it only touches those k values; top-p alone sorts
the V logits once (its threshold depends on the whole ordering); min-p alone is a max.
Nothing here reads back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

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

    @property
    def filtered(self) -> bool:
        """Whether any of top-k, top-p, min-p removes tokens."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0


def _top_p_threshold(ascending: mx.array, w: mx.array, z: mx.array, top_p: float) -> mx.array:
    """Smallest kept value of ``ascending`` (sorted scaled logits) under top-p.

    ``w``: the weights ``exp(ascending - top)``; ``z``: the distribution's total weight on the
    same scale. A value is kept while the weight strictly above it in descending order is
    below ``top_p * z``.
    """
    above = mx.cumsum(w, axis=-1, reverse=True, inclusive=False)
    dropped = (above >= top_p * z).sum(axis=-1, keepdims=True)
    return mx.take_along_axis(ascending, dropped, axis=-1)


def keep_threshold(x: mx.array, params: SamplingParams) -> mx.array:
    """Threshold ``[..., 1]`` on scaled logits ``x`` (``logits / temperature``): the kept tokens are ``x >= t``."""
    V = x.shape[-1]
    top = mx.max(x, axis=-1, keepdims=True)
    thr = mx.full(top.shape, -math.inf, mx.float32)
    k = params.top_k if 0 < params.top_k < V else 0
    if k:
        cand = mx.topk(x, k, axis=-1)  # the k largest, unordered
        kth = mx.min(cand, axis=-1, keepdims=True)
        thr = kth
    if params.top_p < 1.0:
        if k:
            # Only the k candidates and the ties of the k-th value outside them (all weighing exp(kth - top))
            # are left; sorting the k candidates is enough to place the threshold.
            ties_out = (x >= kth).sum(axis=-1, keepdims=True) - k
            asc = mx.sort(cand, axis=-1)
            w = mx.exp(asc - top)
            z = w.sum(axis=-1, keepdims=True) + ties_out * mx.exp(kth - top)
        else:
            asc = mx.sort(x, axis=-1)
            w = mx.exp(asc - top)
            z = w.sum(axis=-1, keepdims=True)
        thr = mx.maximum(thr, _top_p_threshold(asc, w, z, params.top_p))
    if params.min_p > 0:
        # min-p compares with the largest probability; renormalising does not change that ratio.
        thr = mx.maximum(thr, top + math.log(params.min_p))
    return thr


@lru_cache(maxsize=32)
def _masker(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """Compiled ``logits -> masked scaled logits`` (filtered tokens at -inf) for one setting."""

    def masked(logits: mx.array) -> mx.array:
        x = logits.astype(mx.float32) * (1.0 / params.temperature)
        if not params.filtered:
            return x
        return mx.where(x >= keep_threshold(x, params), x, -math.inf)

    return mx.compile(masked)


def masked_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature-scaled logits with every filtered token at ``-inf`` (not greedy)."""
    if params.greedy:
        raise ValueError("greedy decoding has no sampling distribution to mask; use an argmax")
    return _masker(params)(logits)


def probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Distribution over the last axis after temperature, top-k, top-p and min-p (float32).

    Greedy gives the one-hot argmax. Filters keep ties at their threshold and are
    applied in the order top-k, top-p, min-p, each on the renormalised result of the previous.
    """
    if params.greedy:
        V = logits.shape[-1]
        return (mx.arange(V) == mx.argmax(logits, axis=-1, keepdims=True)).astype(mx.float32)
    return mx.softmax(masked_logits(logits, params), axis=-1)


def sample_token(logits: mx.array, params: SamplingParams, key: mx.array | None = None) -> mx.array:
    """One token per row of ``logits``, drawn from :func:`probs` without building it (lazy, no host read).

    Greedy is an argmax of the logits; otherwise a categorical draw from the masked
    scaled logits (the softmax normalisation is not needed for a draw).
    """
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(masked_logits(logits, params), axis=-1, key=key)


def sample(p: mx.array, key: mx.array | None = None) -> mx.array:
    """Draw one index per row of the distribution ``p`` (last axis)."""
    return mx.random.categorical(mx.log(p), axis=-1, key=key)


def residual(p: mx.array, q: mx.array) -> mx.array:
    """``normalize(max(p - q, 0))``: where to resample after a rejected draft (Leviathan et al.)."""
    r = mx.maximum(p - q, 0.0)
    total = r.sum(axis=-1, keepdims=True)
    # p == q exactly leaves nothing to resample from; any draw from p is then correct.
    return mx.where(total > 0, r / mx.maximum(total, 1e-30), p)
