"""Long prompts through the server (issue 13): an agent-sized prompt on a 64K-context checkpoint.

One scenario, at two lengths: ``CI_TOKENS`` (about 20 s) always, and 32K prompt tokens with
``--runslow`` (3-9 min on the shared 2-core test machine: MLX's CPU build pays 40-110 s per 32K
prefill, and the scenario prefills five times; the full layer's T^2 attention, not the model size,
sets the cost).

- ``/v1/chat/completions`` (openai client) with a long system prompt: usage counts the whole
  prompt, and the greedy reply equals in-process ``stream_generate`` of the same messages, whose
  memory (KV + activations) is within 5 % of the memory plan (``step35_mlx.plan``) for that context;
- ``/v1/messages`` (anthropic client) with the same conversation: the same reply, the prompt
  read from the cache (``cache_read_input_tokens``);
- a second conversation sharing the system prompt hits the prefix cache at the end of the
  system prompt (``cached_tokens`` equals its length) and still equals in-process decoding;
- ``/v1/completions`` with ``echo`` and ``logprobs`` over the whole prompt: every position's
  logprob within 1e-4 of a float64 log-softmax of in-process logits, top-1 alternatives equal.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

from longkit import long_model_dir, long_text  # noqa: E402
from serverkit import live_server  # noqa: E402
from step35_mlx import load, stream_generate  # noqa: E402
from step35_mlx.plan import folder_weight_sizes, fused_attention_available, plan_memory  # noqa: E402
from step35_mlx.prefix_cache import PrefixCache  # noqa: E402
from step35_mlx.server import create_app  # noqa: E402

KEY = "k"
CI_TOKENS = 4096
REPLY = 6  # greedy tokens compared per request
USER = 300  # tokens of each user message; the system prompt holds the rest


@pytest.fixture(scope="module")
def served():
    model, tok = load(long_model_dir(), dtype=mx.float32)
    app = create_app(model, tok, model_name="long", api_key=KEY, prefix_cache=PrefixCache(model, ram_bytes=2 * 10**9))
    with live_server(app) as url:
        yield {"url": url, "model": model, "tok": tok}


def _planned_bytes(context: int) -> int:
    """The memory plan's KV cache + activations for this checkpoint at ``context`` tokens (plain decoding)."""
    folder = long_model_dir()
    plan = plan_memory(json.loads((folder / "config.json").read_text()), recipe=folder_weight_sizes(folder, 4),
                       context=context, activation_dtype_bytes=4, fused_attention=fused_attention_available(),
                       mtp=False)
    return plan.kv + plan.activations


def _greedy(model, tok, messages: list[dict]) -> tuple[str, str]:
    """(reasoning, answer) of in-process greedy decoding (a fresh cache: no reuse of any kind).

    Also checks the memory it took (MLX's peak over what was allocated before: the server's caches
    and the weights stay out) against the memory plan's KV cache + activations for the context.
    """
    held = mx.get_active_memory()
    chunks = list(stream_generate(model, tok, messages, max_tokens=REPLY, temperature=0))
    stats = chunks[-1].stats
    assert stats.prefill_tokens == stats.prompt_tokens
    used, planned = stats.peak_memory_gb * 1e9 - held, _planned_bytes(stats.context_tokens)
    assert 0.95 * planned <= used <= 1.05 * planned, (used, planned)
    return "".join(c.reasoning for c in chunks), "".join(c.content for c in chunks)


def _log_softmax(model, ids: list[int], step: int = 1000) -> np.ndarray:
    """float64 log-softmax of the logits at every position of ``ids`` (chunked forward, own chunk size)."""
    cache = model.make_cache()
    rows = []
    for lo in range(0, len(ids), step):
        logits = model(mx.array(ids[lo:lo + step])[None], cache)[0]
        rows.append(np.asarray(logits.astype(mx.float32), dtype=np.float64))
    x = np.concatenate(rows)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _scenario(served, prompt_tokens: int) -> None:
    model, tok, url = served["model"], served["tok"], served["url"]
    oa = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=1800)
    an = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=1800)
    seed = prompt_tokens  # a new system prompt per length: nothing cached from the other run
    system = long_text(tok, prompt_tokens - USER - 20, seed)
    first = [{"role": "system", "content": system}, {"role": "user", "content": long_text(tok, USER, seed + 1)}]
    ids = list(tok.apply_chat_template(first, add_generation_prompt=True))
    head = len(tok.apply_chat_template(first[:1], add_generation_prompt=False))
    assert prompt_tokens - 40 <= len(ids) <= prompt_tokens + 40
    reasoning, answer = _greedy(model, tok, first)

    r = oa.chat.completions.create(model="long", messages=first, max_tokens=REPLY, temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == REPLY
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    msg = r.choices[0].message
    assert ((msg.model_extra.get("reasoning_content") or ""), msg.content) == (reasoning, answer)

    m = an.messages.create(model="long", system=system, messages=first[1:], max_tokens=REPLY,
                           extra_body={"temperature": 0, "thinking": {"type": "adaptive"}})
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(ids)
    assert m.usage.cache_read_input_tokens >= len(ids) - 8  # resent whole: at most a few tokens prefilled
    shown = ("".join(b.thinking for b in m.content if b.type == "thinking"),
             "".join(b.text for b in m.content if b.type == "text"))
    assert shown == (reasoning, answer)

    second = [first[0], {"role": "user", "content": long_text(tok, USER, seed + 2)}]
    r2 = oa.chat.completions.create(model="long", messages=second, max_tokens=REPLY, temperature=0)
    assert r2.usage.prompt_tokens == len(tok.apply_chat_template(second, add_generation_prompt=True))
    assert r2.usage.prompt_tokens_details.cached_tokens == head >= prompt_tokens - USER - 60
    msg2 = r2.choices[0].message
    assert ((msg2.model_extra.get("reasoning_content") or ""), msg2.content) == _greedy(model, tok, second)

    c = oa.completions.create(model="long", prompt=ids, echo=True, logprobs=1, max_tokens=0)
    assert c.usage.prompt_tokens == len(ids)
    lp = c.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    ref = _log_softmax(model, ids)
    got = np.array(lp.token_logprobs[1:], dtype=np.float64)
    want = ref[np.arange(len(ids) - 1), ids[1:]]
    assert np.abs(got - want).max() <= 1e-4
    for i in range(1, len(ids), 97):  # a sample of positions: the top alternative is the reference's argmax
        (text, value), = lp.top_logprobs[i].items()
        best = int(np.argmax(ref[i - 1]))
        assert text == tok.decode([best], skip_special_tokens=False) and abs(value - ref[i - 1, best]) <= 1e-4


def test_long_prompt_through_the_server(served):
    _scenario(served, CI_TOKENS)


@pytest.mark.slow
def test_32k_prompt_through_the_server(served):
    _scenario(served, 32768)
