"""The HTTP server: a live uvicorn on loopback with the demo model, driven by the official openai/anthropic clients."""

from __future__ import annotations

import importlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

try:  # the openai/anthropic clients bring httpx2 (or httpx, in older releases)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
uvicorn = pytest.importorskip("uvicorn")

from serverkit import anthropic_client, demo_server, openai_client  # noqa: E402
import scripted  # noqa: E402

generate_mod = importlib.import_module("step35_mlx.generate")  # the package exports a function `generate`

KEY = "test-key"
Q = [{"role": "user", "content": "What is 2+2?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
RECORDED = ("Use the tool.\n</think>\n"
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")



@pytest.fixture(scope="module")
def server():
    with demo_server(KEY, max_queue=8) as s:
        yield s


@pytest.fixture
def oa(server):
    return openai_client(server["url"], KEY)


@pytest.fixture
def an(server):
    return anthropic_client(server["url"], KEY)


@pytest.fixture
def recorded(monkeypatch, server):
    """Make the model 'generate' RECORDED, then eos (run through the cache, so the cache stays exact)."""
    script = scripted.reply_ids(server["tok"], RECORDED)
    scripted.use(monkeypatch, scripted.scripted(script))
    return script


@pytest.fixture
def endless(monkeypatch, server):
    """A model that never stops by itself (one token every 20 ms, fed through the cache)."""
    tok = server["tok"].encode(" la", add_special_tokens=False)[-1]
    scripted.use(monkeypatch, scripted.endless(tok, delay=0.02))


def _prompt_len(server, messages, tools=None) -> int:
    return len(server["tok"].apply_chat_template(messages, tools=tools, add_generation_prompt=True))


# ---------------------------------------------------------------- basics


def test_health_and_models(server, oa):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    assert [m.id for m in oa.models.list().data] == ["step-demo"]


def test_openai_chat_non_stream_usage_and_reasoning(server, oa):
    r = oa.chat.completions.create(model="step-demo", messages=Q, max_tokens=8, temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == _prompt_len(server, Q)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # the demo model is still reasoning after 8 tokens: it all lands in reasoning_content
    assert msg.model_extra["reasoning_content"]
    assert not msg.content
    direct = "".join(c.reasoning for c in generate_mod.stream_generate(
        server["model"], server["tok"], Q, max_tokens=8, temperature=0))
    assert msg.model_extra["reasoning_content"] == direct


def test_openai_chat_stream_matches_non_stream(server, oa):
    ref = oa.chat.completions.create(model="step-demo", messages=Q, max_tokens=8, temperature=0)
    stream = oa.chat.completions.create(model="step-demo", messages=Q, max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    reasoning, finish, usage = "", None, None
    for ev in stream:
        if ev.usage:
            usage = ev.usage
        for ch in ev.choices:
            reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            finish = ch.finish_reason or finish
    assert reasoning == ref.choices[0].message.model_extra["reasoning_content"]
    assert finish == "length"
    assert usage.completion_tokens == 8 and usage.prompt_tokens == ref.usage.prompt_tokens


def test_openai_stop_string(oa):
    # reasoning_effort "none" closes the reasoning at once: the stop applies to the answer (after </think>)
    kw = dict(model="m", messages=Q, max_tokens=8, temperature=0, reasoning_effort="none")
    ref = oa.chat.completions.create(**kw).choices[0].message.content
    stop = ref.split()[1]
    r = oa.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == ref[:ref.index(stop)]


def test_openai_completions_raw(server, oa):
    r = oa.completions.create(model="m", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    ids = generate_mod.encode_prompt(server["tok"], "The capital of France is")
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text == generate_mod.generate(server["model"], server["tok"], "The capital of France is",
                                                      max_tokens=6, temperature=0)


def test_anthropic_non_stream_and_stream(server, an):
    kw = dict(model="claude-x", max_tokens=8, extra_body={"temperature": 0, "thinking": {"type": "adaptive"}},
              system="Be brief.",
              messages=[{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}])
    m = an.messages.create(**kw)
    assert m.stop_reason == "max_tokens"
    assert m.content[0].type == "thinking" and m.content[0].thinking and m.content[0].signature == ""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    # Anthropic's split: input_tokens are the prompt tokens not read from the cache
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == _prompt_len(server, msgs)
    assert m.usage.cache_creation_input_tokens == 0 and m.usage.output_tokens == 8
    types = []
    with an.messages.stream(**kw) as s:
        for ev in s:
            types.append(ev.type)
        final = s.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(types)
    assert final.content[0].thinking == m.content[0].thinking
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8


def test_anthropic_stop_sequence_and_count_tokens(server, an):
    kw = dict(model="c", max_tokens=8, messages=Q,
              extra_body={"temperature": 0, "thinking": {"type": "enabled", "budget_tokens": 0}})
    ref = an.messages.create(**kw)
    assert ref.content[0].type == "text"  # a budget of 0 closes the reasoning at once: no thinking text
    word = ref.content[0].text.split()[1]
    m = an.messages.create(stop_sequences=[word], **kw)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert m.content[0].text == ref.content[0].text[:ref.content[0].text.index(word)]
    assert an.messages.count_tokens(model="c", messages=Q).input_tokens == _prompt_len(server, Q)


# ---------------------------------------------------------------- tools (recorded model output)


def test_openai_tool_round_trip(server, oa, recorded):
    r = oa.chat.completions.create(model="m", messages=Q, tools=TOOLS, max_tokens=200, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.model_extra["reasoning_content"] == "Use the tool."
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert r.usage.completion_tokens == len(recorded)
    # stream: the same call arrives as a delta
    deltas = [c for ev in oa.chat.completions.create(model="m", messages=Q, tools=TOOLS, max_tokens=200, stream=True)
              for ch2 in ev.choices for c in (ch2.delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and json.loads(deltas[0].function.arguments)["days"] == 2
    # send the result back: the conversation renders with the assistant call and the tool result
    history = Q + [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    raw = oa.chat.completions.with_raw_response.create(model="m", messages=history, tools=TOOLS, max_tokens=200)
    r2 = raw.parse()
    assert int(raw.headers["x-prefill-tokens"]) < r2.usage.prompt_tokens  # the system+tools+question prefix is reused
    want = _prompt_len(server, [Q[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny, 21 C"}], TOOLS)
    assert r2.usage.prompt_tokens == want
    # tool_choice none: no tools, so the markup stays plain text
    r3 = oa.chat.completions.create(model="m", messages=Q, tools=TOOLS, tool_choice="none", max_tokens=200)
    assert r3.choices[0].finish_reason == "stop" and "<tool_call>" in r3.choices[0].message.content


def test_anthropic_tool_round_trip(server, an, recorded):
    tools = [{"name": "get_weather", "description": "Weather for a city",
              "input_schema": TOOLS[0]["function"]["parameters"]}]
    think = {"type": "enabled", "budget_tokens": 1024}  # thinking blocks only when asked for
    m = an.messages.create(model="c", max_tokens=200, tools=tools, messages=Q, thinking=think)
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["thinking", "tool_use"]
    use = m.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris", "days": 2}
    with an.messages.stream(model="c", max_tokens=200, tools=tools, messages=Q, thinking=think) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[1].input == {"city": "Paris", "days": 2}
    follow = Q + [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    m2 = an.messages.create(model="c", max_tokens=200, tools=tools, messages=follow)
    want = _prompt_len(server, [Q[0], {"role": "assistant", "content": "", "reasoning_content": m.content[0].thinking,
                                       "tool_calls": [{"type": "function", "function": {
                                           "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
                                {"role": "tool", "name": "get_weather", "content": "sunny"}],
                       [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                          "parameters": tools[0]["input_schema"]}}])
    assert m2.usage.input_tokens + m2.usage.cache_read_input_tokens == want
    assert m2.usage.cache_read_input_tokens > 400  # the session's cache held the first turn's prompt


# ---------------------------------------------------------------- cache reuse, concurrency, disconnects


def test_prefix_reuse_header(server):
    h = {"authorization": f"Bearer {KEY}"}
    url = server["url"] + "/v1/chat/completions"
    turn1 = [{"role": "user", "content": "Name a color."}]
    r1 = httpx.post(url, headers=h, json={"messages": turn1, "max_tokens": 6, "temperature": 0}, timeout=60)
    a1 = r1.json()["choices"][0]["message"]
    turn2 = turn1 + [{"role": "assistant", "content": a1["content"] or "Blue.",
                      "reasoning_content": a1["reasoning_content"]},
                     {"role": "user", "content": "And another?"}]
    r2 = httpx.post(url, headers=h, json={"messages": turn2, "max_tokens": 6, "temperature": 0}, timeout=60)
    prompt2 = r2.json()["usage"]["prompt_tokens"]
    prefill2 = int(r2.headers["x-prefill-tokens"])
    assert prompt2 == _prompt_len(server, turn2)
    assert 0 < prefill2 < prompt2 - 10
    assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt2 - prefill2
    # the reused answer equals a cold run of the same conversation
    cold = "".join(c.reasoning for c in generate_mod.stream_generate(
        server["model"], server["tok"], turn2, max_tokens=6, temperature=0))
    assert r2.json()["choices"][0]["message"]["reasoning_content"] == cold


def test_eight_concurrent_clients(server, oa):
    questions = [f"Tell me about topic number {i}." for i in range(8)]

    def ask(q):
        r = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], max_tokens=4,
                                       temperature=0)
        return r.choices[0].message.model_extra["reasoning_content"], r.usage.completion_tokens

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(ask, questions))
    assert together == alone
    assert all(n == 4 for _, n in together)


def test_disconnect_frees_the_server(server, oa, endless):
    app = server["app"]
    h = {"x-api-key": KEY}
    body = {"messages": Q, "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server["url"] + "/v1/chat/completions", headers=h, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        # the response is closed mid-stream: the generation stops
    deadline = time.time() + 8
    while app.state.engine.inflight and time.time() < deadline:
        time.sleep(0.05)
    assert app.state.engine.inflight == 0
    session = app.state.engine.session
    assert session.messages[-1].get("interrupted") and session.last_stats.generation_tokens < 3000
    r = oa.chat.completions.create(model="m", messages=Q, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.choices[0].message.model_extra["reasoning_content"] == server["tok"].decode(
        server["tok"].encode(" la", add_special_tokens=False)[-1:]) * 4


def test_queue_full_429(server, endless):
    engine = server["app"].state.engine
    h = {"x-api-key": KEY}
    old = engine.max_queue
    engine.max_queue = 0
    try:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", server["url"] + "/v1/chat/completions", headers=h,
                          json={"messages": Q, "max_tokens": 3000, "temperature": 0, "stream": True}) as r:
                lines = r.iter_lines()  # keep the iterator: dropping it may close the response
                next(lines)
                assert engine.inflight == 1
                busy = c.post(server["url"] + "/v1/chat/completions", headers=h, json={"messages": Q, "max_tokens": 2})
                busy_a = c.post(server["url"] + "/v1/messages", headers=h,
                                json={"model": "c", "messages": Q, "max_tokens": 2})
    finally:
        engine.max_queue = old
    assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
    assert busy_a.status_code == 429 and busy_a.json() == {"type": "error", "error": {
        "type": "rate_limit_error", "message": busy_a.json()["error"]["message"]}}


# ---------------------------------------------------------------- bad input


def _openai_shape(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def _anthropic_shape(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}


@pytest.mark.parametrize("path,headers,body,status", [
    ("/v1/chat/completions", {}, {"messages": Q}, 401),
    ("/v1/chat/completions", {"authorization": "Bearer wrong"}, {"messages": Q}, 401),
    ("/v1/chat/completions", None, b"{not json", 400),
    ("/v1/chat/completions", None, [1, 2], 400),
    ("/v1/chat/completions", None, {"messages": "hi"}, 400),
    ("/v1/chat/completions", None, {"messages": Q, "max_tokens": "many"}, 400),
    ("/v1/chat/completions", None, {"messages": Q, "temperature": -1}, 400),
    ("/v1/chat/completions", None, {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", None, {"messages": [{"role": "user", "content": "hi " * 4200}], "max_tokens": 2}, 400),
    ("/v1/chat/completions", None, {"messages": Q, "tool_choice": "sometimes", "tools": TOOLS}, 400),
    ("/v1/completions", None, {"prompt": 5}, 400),
    ("/v1/completions", {"x-api-key": "nope"}, {"prompt": "hi"}, 401),
])
def test_openai_errors(server, path, headers, body, status):
    h = {"x-api-key": KEY} if headers is None else headers
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    _openai_shape(httpx.post(server["url"] + path, headers=h, timeout=30, **kw), status)


@pytest.mark.parametrize("headers,body,status", [
    ({}, {"model": "c", "max_tokens": 4, "messages": Q}, 401),
    ({"x-api-key": "wrong"}, {"model": "c", "max_tokens": 4, "messages": Q}, 401),
    (None, b"{", 400),
    (None, {"model": "c", "messages": Q}, 400),  # max_tokens is required
    (None, {"model": "c", "max_tokens": "4", "messages": Q, "system": 3}, 400),
    (None, {"model": "c", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400),
    (None, {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi " * 4200}]}, 400),
])
def test_anthropic_errors(server, headers, body, status):
    h = {"x-api-key": KEY} if headers is None else headers
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    _anthropic_shape(httpx.post(server["url"] + "/v1/messages", headers=h, timeout=30, **kw), status)


def test_clients_raise_typed_errors_and_server_survives(server, oa):
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    an_bad = anthropic.Anthropic(base_url=server["url"], api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        an_bad.messages.create(model="c", max_tokens=4, messages=Q)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "la " * 5000}], max_tokens=4)
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    assert httpx.get(server["url"] + "/nope").status_code == 404


def test_serve_command_is_registered():
    from typer.testing import CliRunner

    from step35_mlx.cli import app

    r = CliRunner().invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--api-key" in r.output and "--max-queue" in r.output


# ---------------------------------------------------------------- request limits (hostile bodies)


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _auth():
    return {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}


@pytest.mark.parametrize("path, kind", [("/v1/chat/completions", "invalid_request_error"),
                                        ("/v1/messages", "request_too_large")])
def test_a_body_over_the_bound_gets_413_before_it_is_read(server, path, kind):
    big = b'{"messages": "' + b"a" * 9_000_000 + b'"}'
    r = httpx.post(server["url"] + path, content=big, headers=_auth(), timeout=60)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["type"] == kind and "at most 8,000,000" in err["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"a" * 500_000

    r = httpx.post(server["url"] + path, content=chunks(), headers=_auth(), timeout=60)
    assert r.status_code == 413


def test_memory_returns_to_baseline_after_large_rejected_requests(server):
    def post(body):
        return httpx.post(server["url"] + "/v1/chat/completions", content=body, headers=_auth(), timeout=60)

    post(b"{}")
    base = _rss_mb()
    for _ in range(8):
        assert post(b'{"x": "' + b"a" * 7_900_000 + b'"').status_code == 400  # just under the bound, not JSON
        assert post(b"[" * 7_900_000).status_code == 400  # nested far too deep
        assert post(b"a" * 20_000_000).status_code == 413
    assert _rss_mb() - base < 120, (base, _rss_mb())


def test_deep_nesting_is_400_and_internal_errors_keep_their_text(server, monkeypatch, oa):
    deep = b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = httpx.post(server["url"] + "/v1/chat/completions", content=deep, headers=_auth(), timeout=60)
    assert r.status_code == 400 and "nested more than" in r.json()["error"]["message"]

    def broken(*a, **k):
        raise TypeError("key(): incompatible function arguments")

    scripted.use(monkeypatch, broken)
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert "incompatible" not in str(e.value.body) and "key()" not in str(e.value.body)


@pytest.mark.parametrize("extra, field", [({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
                                          ({"temperature": 1e400}, "temperature must be a finite number"),
                                          ({"top_p": "NaN"}, "top_p")])
def test_bad_sampling_values_are_400(server, extra, field):
    body = json.dumps({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **extra})
    body = body.replace("Infinity", "1e400")
    r = httpx.post(server["url"] + "/v1/chat/completions", content=body.encode(), headers=_auth(), timeout=60)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def _tool(name: str, props: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props or {}}}}


@pytest.mark.parametrize("tools, message", [
    ([_tool("")], "tool name ''"),
    ([_tool("read<file>")], "without '<', '>'"),
    ([_tool("a\nb")], "line breaks"),
    ([_tool("t"), _tool("t")], "two tools are named 't'"),
    ([_tool("t", {"pa>th": {"type": "string"}})], "parameter name 'pa>th'"),
])
def test_tool_names_the_call_syntax_cannot_carry_are_400(server, an, tools, message):
    """``<function=NAME>`` / ``<parameter=KEY>``: a name with '<', '>' or a newline would be cut by the parser."""
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    r = httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "tools"
    anth = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in tools]
    with pytest.raises(anthropic.BadRequestError, match=re.escape(message)):
        an.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}], tools=anth)


def test_usual_tool_names_pass(server, oa):
    """MCP-style, dotted and dashed names (Claude Code, Codex, opencode send such) are accepted."""
    tools = [_tool("mcp__github__create_issue", {"repo": {"type": "string"}}), _tool("shell.exec"), _tool("apply-patch")]
    r = oa.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}], tools=tools)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
