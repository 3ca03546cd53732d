"""A stop check during prefill (issue 13: a client that goes away mid-prefill frees the worker).

The token generators ask ``should_stop()`` before every prefill forward: True after ``k`` checks
leaves exactly ``k`` chunks in the cache and ends the generator without a token, and decoding
resumed from that cache gives the uninterrupted tokens. ``ChatSession`` and ``stream_generate``
carry it to the prefill; a stopped turn leaves the session able to answer the same conversation
as if the turn never ran.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from step35_mlx import load_model
from step35_mlx.decode import ar_tokens, prefill
from step35_mlx.generate import stream_generate
from step35_mlx.prefix_cache import PrefixCache
from step35_mlx.sampling import SamplingParams
from step35_mlx.session import ChatSession
from step35_mlx.speculative import speculative_tokens
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
STEP = 16


class StopAfter:
    """A stop check that answers True from its ``k + 1``-th call on; counts its calls."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.k


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("stop") / "ckpt"
    write_hf_checkpoint(path, tiny_config(num_layers=4, full_layers={0}, moe_layers={2}, sliding_window=8), seed=3)
    return load_model(path, dtype=mx.float32)


def _prompt(n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(3, 250, size=n), dtype=mx.int32)


def _offsets(cache: list) -> set[int]:
    return {c.offset for c in cache}


def test_prefill_stops_after_exactly_k_chunks(model):
    cache = model.make_cache()
    check = StopAfter(3)
    assert prefill(model, cache, _prompt(100), STEP, should_stop=check) is False
    assert check.calls == 4 and _offsets(cache) == {3 * STEP}
    cache = model.make_cache()
    assert prefill(model, cache, _prompt(100), STEP, should_stop=StopAfter(99)) is True
    assert _offsets(cache) == {100}


@pytest.mark.parametrize("k", [0, 1, 5, 7])
def test_ar_tokens_stops_after_k_chunks_without_a_token(model, k):
    """101 tokens at 16 a chunk: 7 chunks of the first 100, then the last token's forward (the 8th)."""
    prompt = _prompt(101)
    cache = model.make_cache()
    check = StopAfter(k)
    assert list(ar_tokens(model, cache, prompt, GREEDY, prefill_step=STEP, should_stop=check)) == []
    assert check.calls == k + 1
    assert _offsets(cache) == {min(k * STEP, 100)}


def test_resuming_a_stopped_prefill_gives_the_uninterrupted_tokens(model):
    prompt = _prompt(150, seed=1)
    fresh = ar_tokens(model, model.make_cache(), prompt, GREEDY, prefill_step=STEP)
    want = [next(fresh) for _ in range(8)]
    cache = model.make_cache()
    assert list(ar_tokens(model, cache, prompt, GREEDY, prefill_step=STEP, should_stop=StopAfter(4))) == []
    done = cache[0].offset
    resumed = ar_tokens(model, cache, prompt[done:], GREEDY, prefill_step=STEP, should_stop=lambda: False)
    assert done == 4 * STEP and [next(resumed) for _ in range(8)] == want


def test_mtp_prefill_stops_after_k_chunks(model):
    prompt = _prompt(90, seed=2)
    cache = model.make_cache()
    check = StopAfter(2)
    gen = speculative_tokens(model, cache, prompt, GREEDY, depth=2, key=mx.random.key(0), prefill_step=STEP,
                             should_stop=check)
    assert list(gen) == [] and check.calls == 3 and _offsets(cache) == {2 * STEP}


def _messages(n_system: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "tool", "list"], size=n_system))
    return [{"role": "system", "content": words}, {"role": "user", "content": "and so " + words[:40]}]


@pytest.fixture(scope="module")
def chat_model():
    from step35_mlx.loader import load

    return load("demo")


# 202 prompt tokens, of which 168 are the system prompt (the head, 11 chunks, when there is a prefix
# cache): stop in the head, after it, and with no prefix cache
@pytest.mark.parametrize("k,held,shared", [(2, 32, True), (12, 168 + STEP, True), (5, 5 * STEP, False)])
def test_session_turn_stopped_in_prefill_then_same_conversation(chat_model, k, held, shared):
    """The stopped turn yields nothing and leaves whole chunks in the session's cache and in the prefix
    cache; the same conversation then answers as fresh greedy decoding does, reusing those chunks."""
    model, tok = chat_model
    messages = _messages(60, seed=2)
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert (len(ids), len(tok.apply_chat_template(messages[:1]))) == (202, 168)
    want = [c.token_ids[0] for c in stream_generate(model, tok, messages, max_tokens=6, temperature=0,
                                                    prefill_step=STEP)]
    pc = PrefixCache(model, ram_bytes=10**8) if shared else None
    kw = dict(prefix_cache=pc, prefill_step=STEP, temperature=0, max_tokens=6)
    session = ChatSession(model, tok, **kw)
    check = StopAfter(k)
    assert list(session.generate_for(messages, should_stop=check)) == []
    assert check.calls == k + 1
    assert session.context_tokens == held and session.cache_tokens == ids[:held] and _offsets(session.cache) == {held}
    assert session.messages[-1].get("interrupted") is True and session.prefilled_tokens == held
    if shared:  # a new conversation restores the stopped turn's state from the prefix cache
        other = ChatSession(model, tok, **kw)
        assert [c.token_ids[0] for c in other.generate_for(messages)] == want
        assert other.last_reuse == "prefix-ram" and other.last_stats.prefill_tokens == len(ids) - held
    got = [c.token_ids[0] for c in session.generate_for(messages)]
    assert got == want
    if not shared:
        assert session.last_reuse == "cache" and session.last_stats.prefill_tokens == len(ids) - held


def test_session_turn_stopped_in_the_head_and_never_iterated(chat_model):
    """The head's prefill runs when the turn starts: stopped there and the stream never read, the
    session still knows what its cache holds and the next turn answers as fresh decoding does."""
    model, tok = chat_model
    messages = _messages(60, seed=2)
    want = [c.token_ids[0] for c in stream_generate(model, tok, messages, max_tokens=6, temperature=0,
                                                    prefill_step=STEP)]
    session = ChatSession(model, tok, prefix_cache=PrefixCache(model, ram_bytes=10**8), prefill_step=STEP,
                          temperature=0, max_tokens=6)
    session.generate_for(messages, should_stop=StopAfter(3))
    assert session.context_tokens == 3 * STEP and _offsets(session.cache) == {3 * STEP}
    assert [c.token_ids[0] for c in session.generate_for(messages)] == want
    assert session.last_stats.prefill_tokens == 202 - 3 * STEP
