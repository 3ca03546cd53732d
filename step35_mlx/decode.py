"""Token generators: prefill a prompt into a cache, then yield sampled token ids forever.

The protocol (:class:`TokenGenerator`): ``gen(model, cache, prompt, params, *, key,
logits_processors, prefill_step, on_prefilled=None, should_stop=None) -> Iterator[int]``.
``cache`` already holds some prefix; ``prompt`` (1-D, non-empty) is the rest, which the
generator prefills in chunks before yielding sampled token ids. When the consumer stops after
token ``t``, the cache holds prefix + prompt + every yielded token up to ``t``, possibly
followed by extra positions (the caller trims them). ``on_prefilled()`` is called once, when
the cache holds the whole prompt and nothing else. ``should_stop()`` is asked before every
prefill forward (each chunk, and the last prompt token's); when it answers True the generator
ends without a token, the cache holding prefix + the whole chunks run so far (a long prompt
whose client went away does not hold the machine for its whole prefill). Between tokens the
consumer stops by closing the generator, as before. :func:`ar_tokens` is plain autoregressive decoding;
:func:`token_generator` is the one place that picks the generator (MTP speculative decoding,
:mod:`step35_mlx.speculative`, plugs in there). All sampling goes through
:mod:`step35_mlx.sampling`, the one definition of the target distribution.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import mlx.core as mx

from .distributed.sync import root_tokens
from .sampling import SamplingParams, sample_token
from .settings import DEFAULT_DRAFT_DEPTH


def new_cache(model: Any, kv_bits: int | None = None, kv_group_size: int | None = None) -> list:
    """``model.make_cache()``, quantized with ``kv_bits``; checks the settings fit the model first.

    ``kv_group_size`` ``None`` picks 64, or 32 when 64 does not divide the head dims.
    """
    if kv_bits is None:
        return model.make_cache()
    if kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    cfg = model.config
    dims = {cfg.head_dim, getattr(cfg, "sliding_head_dim", None) or cfg.head_dim}
    if kv_group_size is None:
        kv_group_size = 64 if all(d % 64 == 0 for d in dims) else 32
    bad = sorted(d for d in dims if d % kv_group_size)
    if bad:
        raise ValueError(f"kv group size {kv_group_size} does not divide the model's head dim {bad[0]}")
    return model.make_cache(kv_bits=kv_bits, kv_group_size=kv_group_size)


class TokenGenerator(Protocol):
    def __call__(self, model: Any, cache: list, prompt: mx.array, params: SamplingParams, *,
                 key: mx.array | None, logits_processors: list | None, prefill_step: int,
                 on_prefilled: Callable[[], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[int]: ...


def _eval_cache(cache: list) -> None:
    mx.eval([[c.keys, c.values] for c in cache if c.keys is not None])


def _trunk(model: Any):
    return getattr(model, "trunk", model)


def last_logits(model: Any, tokens: mx.array, cache: list) -> mx.array:
    """Logits ``[1, V]`` of the last position of ``tokens`` ``[1, T]`` (the LM head runs on that position only)."""
    if hasattr(model, "trunk"):
        return model.logits(model.trunk(tokens, cache)[:, -1, :])
    return model(tokens, cache)[:, -1, :]


def prefill(model: Any, cache: list, tokens: mx.array, prefill_step: int = 512, *,
            should_stop: Callable[[], bool] | None = None) -> bool:
    """Run ``tokens`` (1-D) through the trunk into ``cache`` in chunks of ``prefill_step`` (no LM head).

    ``should_stop()`` is asked before each chunk; returns False when it stopped the prefill
    (the cache then holds the chunks run so far, whole), True when every token went in.
    """
    tokens = tokens.reshape(-1)
    for i in range(0, tokens.size, prefill_step):
        if should_stop is not None and should_stop():
            return False
        _trunk(model)(tokens[i:i + prefill_step][None], cache)
        _eval_cache(cache)
        mx.clear_cache()
    return True


def ar_tokens(
    model: Any,
    cache: list,
    prompt: mx.array,
    params: SamplingParams,
    *,
    key: mx.array | None = None,
    logits_processors: list | None = None,
    prefill_step: int = 512,
    on_prefilled: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """Plain autoregressive decoding: prefill ``prompt`` (chunks of ``prefill_step``), then one token per step.

    ``should_stop``: asked before each prefill chunk and before the last prompt token's
    forward; True ends the generator without a token (see the module docstring).

    The next step is queued with ``mx.async_eval`` before the current token is handed
    out, so the device works while the caller detokenizes and prints. Every yielded
    token has therefore been fed to the cache already (see the module docstring).
    """
    prompt = prompt.reshape(-1).astype(mx.int32)
    if prompt.size == 0:
        raise ValueError("the prompt must contain at least one token that is not in the cache")
    processors = list(logits_processors or [])
    history = prompt

    def next_key() -> mx.array | None:
        nonlocal key
        if key is None:
            return None
        key, sub = mx.random.split(key)
        return sub

    def pick(logits: mx.array, hist: mx.array) -> mx.array:
        for proc in processors:
            logits = proc(hist, logits)
        return root_tokens(model, sample_token(logits, params, next_key()).astype(mx.int32))

    # All but the last token go through the trunk with only the cache evaluated, so no position but
    # the last runs the final layer's FFN (no cache needs it), as in mlx-lm; the last token gives the logits.
    last = prompt.size - 1
    if not prefill(model, cache, prompt[:last], prefill_step, should_stop=should_stop):
        return
    if should_stop is not None and should_stop():
        return
    y = pick(last_logits(model, prompt[last:][None], cache), history)
    mx.async_eval(y)
    if on_prefilled is not None:
        on_prefilled()
    n = 0
    while True:
        if processors:
            history = mx.concatenate([history, y])
        next_y = pick(last_logits(model, y[None], cache), history)
        mx.async_eval(next_y)
        yield int(y.item())
        y = next_y
        n += 1
        if n % 256 == 0:
            mx.clear_cache()


def token_generator(mtp: bool | None = None, draft_depth: int | None = None) -> TokenGenerator:
    """The one place that chooses the decoding loop for a request: plain, or MTP with ``draft_depth`` drafts."""
    if not mtp:
        return ar_tokens
    from .speculative import MTPDecoder

    return MTPDecoder(draft_depth or DEFAULT_DRAFT_DEPTH)
