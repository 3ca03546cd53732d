"""Agent clients on the server: Claude Code and opencode request shapes, thinking and stop rules,
``max_tokens`` clamped to the context, and the small compatibility items (issue 13, items 1, 3, 5, 7)."""

from __future__ import annotations

import importlib
import json

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
uvicorn = pytest.importorskip("uvicorn")

from serverkit import anthropic_client, demo_server, openai_client  # noqa: E402
import scripted  # noqa: E402
from step35_mlx.server.messages import anthropic_messages, openai_messages  # noqa: E402
from step35_mlx.server.schemas import AnthRequest, OAIChatRequest  # noqa: E402
from step35_mlx.thinking import EFFORT_BUDGETS  # noqa: E402


generate_mod = importlib.import_module("step35_mlx.generate")

KEY = "k"
CONTEXT = 768  # a small context, so clamped replies stay short (the Claude Code body is ~520 tokens)
H = {"x-api-key": KEY, "authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

# A captured-shape Claude Code request (/v1/messages?beta=true): system blocks with cache_control,
# system entries inside messages, tools with cache_control, metadata, context_management, max_tokens 32000.
CLAUDE_CODE = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 32000,
    "temperature": 1,
    "stream": True,
    "metadata": {"user_id": "user_abc_account__session_123"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
               {"type": "text", "text": "Use the tools.", "cache_control": {"type": "ephemeral"}}],
    "tools": [{"name": "Bash", "description": "Run a command", "cache_control": {"type": "ephemeral"},
               "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                                "required": ["command"], "$schema": "http://json-schema.org/draft-07/schema#",
                                "additionalProperties": False}}],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nThis is a reminder.\n</system-reminder>"},
            {"type": "text", "text": "list files", "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "Git status: clean."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "Bash",
                                           "input": {"command": "ls"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                      "content": [{"type": "text", "text": "README.md"}]}]},
        {"role": "system", "content": [{"type": "text", "text": "Be concise."}]},
        {"role": "user", "content": "thanks"}],
}

# A captured-shape opencode request (AI SDK openai-compatible provider): content parts, tools,
# max_tokens 32000, streaming with usage.
OPENCODE = {
    "model": "step-demo",
    "max_tokens": 32000,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
    "tool_choice": "auto",
    "messages": [
        {"role": "system", "content": "You are opencode, an interactive CLI tool."},
        {"role": "system", "content": "Here is some useful information about the environment."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "tools": [{"type": "function", "function": {"name": "bash", "description": "Run a command",
                                                "parameters": {"type": "object",
                                                               "properties": {"command": {"type": "string"}},
                                                               "required": ["command"],
                                                               "additionalProperties": False,
                                                               "$schema": "http://json-schema.org/draft-07/schema#"}}}],
}



@pytest.fixture(scope="module")
def server():
    with demo_server(KEY, max_context=CONTEXT) as s:
        yield s


@pytest.fixture
def oa(server):
    return openai_client(server["url"], KEY)


@pytest.fixture
def an(server):
    return anthropic_client(server["url"], KEY)


def _script(monkeypatch, tok, text: str) -> None:
    """The model 'generates' ``text`` then eos (fed through the cache, so the cache stays exact)."""
    scripted.use(monkeypatch, scripted.scripted(scripted.reply_ids(tok, text)))


@pytest.fixture
def endless(monkeypatch, server):
    """A model that never stops by itself: only the context ends its reply."""
    tok = server["tok"].encode(" la", add_special_tokens=False)[-1]
    scripted.use(monkeypatch, scripted.endless(tok))


def _events(r) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line[6:] != "[DONE]"]


def _prompt_len(server, messages, tools=None) -> int:
    return len(server["tok"].apply_chat_template(messages, tools=tools, add_generation_prompt=True))


# ---------------------------------------------------------------- item 1: Claude Code and opencode


def test_system_entries_in_messages_join_the_system_prompt_in_order():
    msgs = anthropic_messages(AnthRequest.model_validate(CLAUDE_CODE))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    assert msgs[0]["content"] == ("You are Claude Code, Anthropic's official CLI for Claude.Use the tools."
                                  "\n\nGit status: clean.\n\nBe concise.")
    assert msgs[3] == {"role": "tool", "name": "Bash", "content": "README.md"}


def test_claude_code_body_streams(server):
    r = httpx.post(server["url"] + "/v1/messages?beta=true", json=CLAUDE_CODE, timeout=120,
                   headers={**H, "anthropic-version": "2023-06-01",
                            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"})
    assert r.status_code == 200, r.text
    ev = _events(r)
    assert ev[0]["type"] == "message_start" and ev[-1]["type"] == "message_stop"
    blocks = [e["content_block"]["type"] for e in ev if e["type"] == "content_block_start"]
    assert "thinking" not in blocks  # no thinking field: no thinking blocks
    stop = next(e for e in ev if e["type"] == "message_delta")
    assert stop["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")
    body = {k: v for k, v in CLAUDE_CODE.items() if k in ("model", "messages", "system", "tools")}
    count = httpx.post(server["url"] + "/v1/messages/count_tokens?beta=true", json=body, headers=H).json()
    msgs = anthropic_messages(AnthRequest.model_validate(CLAUDE_CODE))
    tools = [{"type": "function", "function": {"name": "Bash", "description": "Run a command",
                                               "parameters": CLAUDE_CODE["tools"][0]["input_schema"]}}]
    assert count["input_tokens"] == _prompt_len(server, msgs, tools)
    assert ev[0]["message"]["usage"]["input_tokens"] + ev[0]["message"]["usage"]["cache_read_input_tokens"] \
        == count["input_tokens"]


def test_opencode_body_streams_with_usage(server):
    r = httpx.post(server["url"] + "/v1/chat/completions", json=OPENCODE, headers=H, timeout=120)
    assert r.status_code == 200, r.text
    ev = _events(r)
    finish = [c["finish_reason"] for e in ev for c in e["choices"] if c["finish_reason"]]
    assert finish and finish[-1] in ("stop", "length", "tool_calls")
    usage = ev[-1]["usage"]
    msgs = openai_messages(OAIChatRequest.model_validate(OPENCODE).messages)
    assert usage["prompt_tokens"] == _prompt_len(server, msgs, OPENCODE["tools"])
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] <= usage["completion_tokens"]


# ---------------------------------------------------------------- item 7: the small ones

PARALLEL = ("Two calls.\n</think>\n\n"
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>\n")


def test_no_whitespace_content_around_parallel_tool_calls(server, oa, an, monkeypatch):
    _script(monkeypatch, server["tok"], PARALLEL)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    r = oa.chat.completions.create(model="m", messages=HI, tools=tools, max_tokens=200)
    msg = r.choices[0].message
    assert msg.content == "" and [json.loads(c.function.arguments)["city"] for c in msg.tool_calls] == ["Paris", "Rome"]
    chunks = list(oa.chat.completions.create(model="m", messages=HI, tools=tools, max_tokens=200, stream=True))
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == []
    m = an.messages.create(model="c", max_tokens=200, messages=HI,
                           tools=[{"name": "get_weather", "input_schema": WEATHER}])
    assert [b.type for b in m.content] == ["tool_use", "tool_use"]
    with an.messages.stream(model="c", max_tokens=200, messages=HI,
                            tools=[{"name": "get_weather", "input_schema": WEATHER}]) as s:
        assert [b.type for b in s.get_final_message().content] == ["tool_use", "tool_use"]


def test_text_whitespace_is_kept_without_tool_calls(server, oa, monkeypatch):
    _script(monkeypatch, server["tok"], "ok\n</think>\nline one\n\nline two\n")
    r = oa.chat.completions.create(model="m", messages=HI, max_tokens=200)
    assert r.choices[0].message.content == "line one\n\nline two\n"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       oa.chat.completions.create(model="m", messages=HI, max_tokens=200, stream=True) if c.choices)
    assert streamed == "line one\n\nline two\n"


def test_model_by_id(oa):
    assert oa.models.retrieve("step-demo").id == "step-demo"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-9")


def test_stream_null_is_false(server):
    r = httpx.post(server["url"] + "/v1/chat/completions", headers=H, timeout=60,
                   json={"messages": HI, "max_tokens": 3, "stream": None})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = httpx.post(server["url"] + "/v1/messages", headers=H, timeout=60,
                   json={"model": "c", "messages": HI, "max_tokens": 3, "stream": None})
    assert r.status_code == 200 and r.json()["type"] == "message"


def test_legacy_function_messages(server, oa):
    legacy = [HI[0], {"role": "assistant", "content": None,
                      "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
              {"role": "function", "name": "get_weather", "content": "sunny"}]
    want = [HI[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny"}]
    assert openai_messages(OAIChatRequest.model_validate({"messages": legacy}).messages) == want
    r = oa.chat.completions.create(model="m", messages=legacy, max_tokens=2)
    assert r.usage.prompt_tokens == _prompt_len(server, want)


def test_document_blocks_are_text(server, an):
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The sky is green."},
           "title": "facts", "cache_control": {"type": "ephemeral"}}
    listed = {"type": "document",
              "source": {"type": "content", "content": [{"type": "text", "text": "Grass is blue."}]}}
    msgs = [{"role": "user", "content": [doc, listed, {"type": "text", "text": " What colour?"}]}]
    n = an.messages.count_tokens(model="c", messages=msgs).input_tokens
    assert n == _prompt_len(server, [{"role": "user", "content": "The sky is green.Grass is blue. What colour?"}])
    assert an.messages.create(model="c", max_tokens=2, messages=msgs).usage.output_tokens == 2
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    with pytest.raises(anthropic.BadRequestError, match="only text documents"):
        an.messages.create(model="c", max_tokens=2, messages=[{"role": "user", "content": [pdf]}])


# ---------------------------------------------------------------- item 5: max_tokens clamped to the context


def test_max_tokens_is_clamped_to_the_context(server, oa, an, endless):
    near = [{"role": "user", "content": "la " * ((CONTEXT - 40) // 2)}]  # two tokens each: leaves a few tokens of room
    r = oa.chat.completions.create(model="m", messages=near, max_tokens=32000)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT and r.usage.completion_tokens > 1
    m = an.messages.create(model="c", max_tokens=32000, messages=near)
    assert m.stop_reason == "max_tokens"
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens + m.usage.output_tokens == CONTEXT
    c = oa.completions.create(model="m", prompt="la " * ((CONTEXT - 30) // 2), max_tokens=32000)
    assert c.choices[0].finish_reason == "length" and c.usage.total_tokens == CONTEXT


def test_a_prompt_over_the_context_is_still_400(oa, an):
    long = [{"role": "user", "content": "la " * (2 * CONTEXT)}]
    with pytest.raises(openai.BadRequestError, match="context limit"):
        oa.chat.completions.create(model="m", messages=long, max_tokens=32000)
    with pytest.raises(anthropic.BadRequestError, match="context limit"):
        an.messages.create(model="c", messages=long, max_tokens=32000)


# ---------------------------------------------------------------- item 3: reasoning-aware stops and thinking


def _full(server, **kw):
    """The demo model's greedy reply to 'hi', split (reasoning, answer), in-process."""
    chunks = list(generate_mod.stream_generate(server["model"], server["tok"], HI, temperature=0, max_tokens=200,
                                               max_context=CONTEXT, **kw))
    return "".join(c.reasoning for c in chunks), "".join(c.content for c in chunks), chunks


def test_stop_strings_apply_only_after_think(server, oa):
    reasoning, answer, _ = _full(server)
    assert reasoning and answer
    stop = next(ch for ch in reasoning if ch.isalpha() and ch in answer)  # in the reasoning and the answer
    r = oa.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=200, stop=[stop])
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == reasoning  # the reasoning ran to </think> untouched
    assert msg.content == answer.split(stop)[0]
    assert r.choices[0].finish_reason == "stop"


def test_anthropic_thinking_blocks_only_when_enabled(server, an):
    reasoning, answer, _ = _full(server)
    for thinking in (None, {"type": "disabled"}):
        extra = {"temperature": 0} if thinking is None else {"temperature": 0, "thinking": thinking}
        m = an.messages.create(model="c", max_tokens=200, messages=HI, extra_body=extra)
        assert [b.type for b in m.content] == ["text"] and m.content[0].text == answer
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"}):
        m = an.messages.create(model="c", max_tokens=200, messages=HI,
                               extra_body={"temperature": 0, "thinking": thinking})
        assert [b.type for b in m.content] == ["thinking", "text"]
        assert m.content[0].thinking == reasoning and m.content[1].text == answer


def test_budget_tokens_closes_the_reasoning(server, an, oa):
    tok = server["tok"]
    _, _, chunks = _full(server)
    free = [c.token_ids[0] for c in chunks]
    budget = 5
    m = an.messages.create(model="c", max_tokens=60, messages=HI,
                           extra_body={"temperature": 0, "thinking": {"type": "enabled", "budget_tokens": budget}})
    # the first `budget` tokens are the model's own, then "\n</think>\n" is forced and the answer follows
    assert m.content[0].type == "thinking"
    assert m.content[0].thinking == tok.decode(free[:budget]).rstrip("\n")
    assert m.content[-1].type == "text" and m.content[-1].text
    _, _, direct = _full(server, reasoning_budget=budget)
    ids = [c.token_ids[0] for c in direct]
    assert ids[budget:budget + 3] == tok.encode("\n</think>\n", add_special_tokens=False)
    assert direct[-1].stats.reasoning_tokens == budget + 2
    r = oa.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=60, reasoning_effort="low")
    assert r.usage.completion_tokens_details.reasoning_tokens == chunks[-1].stats.reasoning_tokens  # 1024: no cut
    r = oa.chat.completions.create(model="m", messages=HI, temperature=0, max_tokens=60, reasoning_effort="none")
    assert r.usage.completion_tokens_details.reasoning_tokens == 2  # "\n</think>" forced at once
    assert not r.choices[0].message.model_extra["reasoning_content"] and r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        oa.chat.completions.create(model="m", messages=HI, max_tokens=2, reasoning_effort="extreme")
    assert EFFORT_BUDGETS["low"] == 1024


def test_budget_with_mtp_equals_plain(server):
    """The budget is a logits processor that reads only the history: MTP drafts and verify rows obey it."""
    plain = [c.token_ids[0] for c in _full(server, reasoning_budget=4, mtp=False)[2]]
    spec = _full(server, reasoning_budget=4, mtp=True)[2]
    assert spec[-1].stats.draft_depth > 0
    assert [c.token_ids[0] for c in spec] == plain
