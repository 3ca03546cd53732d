"""Request bodies captured from third-party clients (``tests/data/client_bodies.json``), replayed over raw HTTP.

Found by ``benchmarks/client_matrix.py``: a forced tool call or a JSON schema (litellm ``response_format``,
LangChain ``bind_tools(tool_choice=...)`` on the Responses API, ``ChatAnthropic.with_structured_output``)
came back with ``finish_reason: "stop"`` and no call / no JSON when the model ended its reply with
end-of-sequence inside its reasoning (the grammar only starts after ``</think>``). Now the end token's
probability goes to ``</think>`` while a constraint that must produce something is pending, so every
reply carries the call or the value, unless ``max_tokens`` cuts it (``length``). And a call that
``max_tokens`` cut is ``length`` / ``max_tokens``, not ``tool_calls`` with incomplete arguments.
"""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("llguidance")
pytest.importorskip("uvicorn")

from step35_mlx.grammar import constraint_for, grammar_processor  # noqa: E402
from serverkit import demo_server  # noqa: E402

KEY = "bodies-key"
BODIES = json.loads((Path(__file__).parent / "data" / "client_bodies.json").read_text())
SEEDS = range(6)


@pytest.fixture(scope="module")
def server():
    with demo_server(KEY) as s:
        yield s


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}",
                                          "x-api-key": KEY, "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def delivered(path: str, body: dict, reply: dict) -> tuple[bool, str]:
    """Whether the reply carries what the constraint demands (or was cut by the token limit); its end reason."""
    if path == "/v1/chat/completions":
        choice = reply["choices"][0]
        if choice["finish_reason"] == "length":
            return True, "length"
        if "tool_choice" in body:
            return bool(choice["message"].get("tool_calls")), choice["finish_reason"]
        return bool((choice["message"].get("content") or "").strip()), choice["finish_reason"]
    if path == "/v1/responses":
        cut = (reply.get("incomplete_details") or {}).get("reason") == "max_output_tokens"
        return cut or any(item["type"] == "function_call" for item in reply["output"]), reply["status"]
    assert path == "/v1/messages"
    cut = reply["stop_reason"] == "max_tokens"
    return cut or any(block["type"] == "tool_use" for block in reply["content"]), reply["stop_reason"]


@pytest.mark.parametrize("name", sorted(BODIES))
def test_captured_body_always_delivers_the_constrained_answer(server, name):
    case = BODIES[name]
    for seed in SEEDS:
        reply = post(server["url"] + case["path"], {**case["body"], "seed": seed})
        ok, reason = delivered(case["path"], case["body"], reply)
        assert ok, (case["client"], seed, reason, json.dumps(reply)[:600])
        if case["path"] == "/v1/chat/completions" and "response_format" in case["body"] and reason == "stop":
            value = json.loads(reply["choices"][0]["message"]["content"])
            assert value["kind"] in ("cat", "dog") and 0 <= value["age"] <= 30


@pytest.mark.parametrize("name", ["litellm_tool_choice", "langchain_anthropic_structured"])
def test_a_call_cut_by_max_tokens_is_length_not_a_call(server, name):
    """LangChain ran a forced ``get_weather`` with ``{}``: the token limit had cut the call, yet the reply said
    ``tool_calls``. A call cut before ``</function>`` now ends ``length`` / ``max_tokens``; a whole one is a call."""
    case = BODIES[name]
    required = set(next(iter(tool.get("function", tool).get("parameters") or tool.get("input_schema")
                             for tool in case["body"]["tools"]))["required"])
    seen = set()
    for limit in (36, 44, 56, 120):  # greedy: the reasoning closes after about 30 tokens, then the call
        reply = post(server["url"] + case["path"], {**case["body"], "max_tokens": limit, "temperature": 0})
        if case["path"] == "/v1/chat/completions":
            choice = reply["choices"][0]
            end, calls = choice["finish_reason"], [json.loads(c["function"]["arguments"])
                                                   for c in choice["message"].get("tool_calls") or []]
            whole = end == "tool_calls"
        else:
            end, calls = reply["stop_reason"], [b["input"] for b in reply["content"] if b["type"] == "tool_use"]
            whole = end == "tool_use"
        assert whole or end in ("length", "max_tokens"), (limit, end)
        if whole:
            assert calls and all(required <= set(args) for args in calls), (limit, calls)
        seen.add((whole, bool(calls)))
    assert seen >= {(True, True), (False, True)}, seen  # both a cut call and a whole one were seen


def test_end_of_sequence_in_reasoning_becomes_think_close():
    """Reasoning rows of a forced constraint: ``</think>`` gets p(close) + p(eos), eos gets 0, the rest is untouched;
    under ``tool_choice`` auto the reply may still end in its reasoning."""
    from step35_mlx import load

    model, tok = load("demo")
    V = model.config.vocab_size
    eos = frozenset(model.config.eos_token_id)
    close = tok.encode("</think>", add_special_tokens=False)[0]
    rng = np.random.default_rng(0)
    raw = rng.standard_normal(V).astype(np.float32)
    raw[sorted(eos)] = 6.0  # the model wants to stop
    logits = mx.array(raw)[None]
    reasoning = mx.array([0, 3] + tok.encode("I think", add_special_tokens=False))
    forced = grammar_processor(constraint_for({"type": "json_object"}), tok, vocab_size=V, eos_ids=eos, start=2,
                               reasoning=True)
    out = np.array(forced(reasoning, logits), dtype=np.float64)[0]
    p = np.exp(raw.astype(np.float64) - np.logaddexp.reduce(raw.astype(np.float64)))
    q = np.exp(out - np.logaddexp.reduce(out[np.isfinite(out)]))
    assert all(out[i] == -math.inf for i in eos) and int(np.argmax(out)) == close
    assert q[close] == pytest.approx(p[close] + sum(p[i] for i in eos), rel=1e-5)
    rest = [i for i in range(V) if i != close and i not in eos]
    np.testing.assert_allclose(q[rest], p[rest], rtol=1e-5)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    auto = grammar_processor(constraint_for(None, tools, "auto"), tok, vocab_size=V, eos_ids=eos, start=2,
                             reasoning=True)
    if auto is not None:
        np.testing.assert_array_equal(np.array(auto(reasoning, logits)), raw[None])
