"""Token log-probabilities of a sequence under the model (``echo``/``logprobs`` of the OpenAI APIs).

:func:`score` runs one forward pass over the whole sequence (in chunks, with a fresh KV
cache) and returns, for every position but the first, the log-softmax of the logits that
predicted it (float32) and the ``top`` most likely alternatives. The values are the
model's raw distribution: no temperature, top-p or other sampling setting applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import mlx.core as mx

from .decode import new_cache

CHUNK = 256  # positions per forward: bounds the [T, vocab] logits held at once
MAX_TOP = 20


@dataclass
class TokenLogprobs:
    """``logprobs[i]`` is log p(ids[i] | ids[:i]) (``None`` for the first token, or before ``start``);
    ``top[i]`` the ``(id, logprob)`` pairs of the most likely tokens at position ``i``, best first."""

    ids: list[int]
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


def score(model: Any, ids: Sequence[int], top: int = 0, start: int = 1) -> TokenLogprobs:
    """Log-probabilities of ``ids[start:]`` (each given the tokens before it) and their top-``top`` alternatives."""
    ids = [int(t) for t in ids]
    if not 0 <= top <= MAX_TOP:
        raise ValueError(f"top logprobs must be from 0 to {MAX_TOP}, got {top}")
    start = max(1, start)
    out = TokenLogprobs(ids=ids, logprobs=[None] * len(ids), top=[[] for _ in ids])
    if len(ids) <= start:
        return out
    cache = new_cache(model)
    toks = mx.array(ids, dtype=mx.int32)
    for lo in range(0, len(ids) - 1, CHUNK):
        hi = min(lo + CHUNK, len(ids) - 1)  # logits of positions lo..hi-1 predict tokens lo+1..hi
        logits = model(toks[lo:hi][None], cache)[0].astype(mx.float32)
        if hi <= start - 1:
            mx.eval([c.keys for c in cache if getattr(c, "keys", None) is not None])
            continue
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nxt = toks[lo + 1:hi + 1]
        picked = mx.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
        if top:
            best = mx.argsort(-logp, axis=-1)[:, :top]
            best_lp = mx.take_along_axis(logp, best, axis=-1)
            mx.eval(picked, best, best_lp)
            best_ids, best_vals = best.tolist(), best_lp.tolist()
        else:
            mx.eval(picked)
        vals = picked.tolist()
        for k in range(hi - lo):
            pos = lo + 1 + k
            if pos < start:
                continue
            out.logprobs[pos] = vals[k]
            if top:
                out.top[pos] = list(zip(best_ids[k], best_vals[k]))
    return out
