"""A scripted 'model' for the server tests: token generators that emit a fixed reply through the real cache.

They follow the token-generator protocol of :mod:`step35_mlx.decode` (the prompt and every
token go through the model, so the cache and the prefix cache stay exact); :func:`use`
makes ``chunks.run`` decode with one of them for the rest of a test.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import mlx.core as mx

from step35_mlx import chunks, decode


def reply_ids(tok: Any, text: str) -> list[int]:
    """``text`` as token ids, then the tokenizer's (smallest) eos id."""
    return tok.encode(text, add_special_tokens=False) + [sorted(tok.eos_token_ids or [2])[0]]


def _prompt_in(model, cache, prompt, prefill_step, on_prefilled, should_stop) -> bool:
    """Prefill the prompt as the real generators do (stoppable between chunks); False when stopped."""
    if not decode.prefill(model, cache, prompt, prefill_step, should_stop=should_stop):
        return False
    if on_prefilled is not None:
        on_prefilled()
    return True


def scripted(ids: list[int], fail_after: int | None = None) -> Callable[..., Iterator[int]]:
    """Yields ``ids`` (the whole reply fed in one forward: the cache may run ahead of the yielded
    tokens, as the protocol allows); ``fail_after``: raise ``RuntimeError`` after that many tokens."""

    def gen(model, cache, prompt, params, *, key, logits_processors, prefill_step, on_prefilled=None,
            should_stop=None):
        if not _prompt_in(model, cache, prompt, prefill_step, on_prefilled, should_stop):
            return
        decode.prefill(model, cache, mx.array(ids), prefill_step)
        if fail_after is None:
            yield from ids
            return
        yield from ids[:fail_after]
        raise RuntimeError("the device went away")

    return gen


def endless(token: int, delay: float = 0.0) -> Callable[..., Iterator[int]]:
    """Yields ``token`` forever, one forward each (``delay`` seconds apart): only a limit ends the reply."""

    def gen(model, cache, prompt, params, *, key, logits_processors, prefill_step, on_prefilled=None,
            should_stop=None):
        if not _prompt_in(model, cache, prompt, prefill_step, on_prefilled, should_stop):
            return
        while True:
            decode.last_logits(model, mx.array([[token]]), cache)
            decode._eval_cache(cache)
            if delay:
                time.sleep(delay)
            yield token

    return gen


def use(monkeypatch: Any, gen: Callable[..., Iterator[int]]) -> None:
    """Every request of this test decodes with ``gen`` (``run`` looks ``token_generator`` up in ``chunks``)."""
    monkeypatch.setattr(chunks, "token_generator", lambda *a, **k: gen)
