"""Structured output and forced tool calls through the server, with the official openai/anthropic clients."""

from __future__ import annotations

import json
from typing import Literal

import pytest

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
uvicorn = pytest.importorskip("uvicorn")
pydantic = pytest.importorskip("pydantic")

from serverkit import anthropic_client, demo_server, openai_client  # noqa: E402

KEY = "test-key"
ASK = [{"role": "user", "content": "Give me a pet as JSON"}]
SEEDS = (1, 2, 3, 4, 5)  # the demo closes its reasoning within 200 tokens for most seeds
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}


class Pet(pydantic.BaseModel):
    name: str
    kind: Literal["cat", "dog", "bird"]
    tags: list[str]


@pytest.fixture(scope="module")
def server():
    with demo_server(KEY, max_queue=8) as s:
        yield s["url"]


def test_openai_parse_helper_gets_a_valid_object(server):
    oa = openai_client(server, KEY)
    answered = 0
    for seed in SEEDS:
        r = oa.chat.completions.parse(model="step-demo", messages=ASK, response_format=Pet, seed=seed,
                                      temperature=1.0, max_tokens=200)
        msg = r.choices[0].message
        if not msg.content:
            continue  # the reasoning did not close (eos or the token budget inside it): no answer to mask
        assert isinstance(msg.parsed, Pet), msg.content
        answered += 1
        if answered == 3:
            break
    assert answered == 3


def test_openai_required_tool_choice_forces_a_valid_call(server):
    oa = openai_client(server, KEY)
    called = 0
    for seed in SEEDS:
        r = oa.chat.completions.create(model="step-demo", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[WEATHER], tool_choice="required", seed=seed, temperature=1.0,
                                       max_tokens=200)
        choice = r.choices[0]
        if not choice.message.tool_calls and not choice.message.content:
            continue  # the reasoning did not close: no answer to mask
        assert not (choice.message.content or "").strip()
        # "length": max_tokens cut the last call before its </function> (its arguments are incomplete)
        assert choice.finish_reason == "tool_calls" or (choice.finish_reason == "length"
                                                         and r.usage.completion_tokens >= 200)
        calls = choice.message.tool_calls
        if r.usage.completion_tokens >= 200:  # one or more calls are allowed: max_tokens cut the last one
            calls = calls[:-1]
        assert calls
        for call in calls:
            args = json.loads(call.function.arguments)
            assert call.function.name == "get_weather" and set(args) == {"city", "days"}
            assert isinstance(args["city"], str) and isinstance(args["days"], int)
        called += 1
        if called == 3:
            break
    assert called == 3


def test_anthropic_named_tool_choice_forces_that_tool(server):
    an = anthropic_client(server, KEY)
    tool = {"name": "get_weather", "description": "Weather for a city",
            "input_schema": WEATHER["function"]["parameters"]}
    clock = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
    m = an.messages.create(model="step-demo", max_tokens=200, tools=[clock, tool],
                           tool_choice={"type": "tool", "name": "get_weather"},
                           messages=[{"role": "user", "content": "Weather in Paris?"}],
                           extra_body={"temperature": 0})  # greedy: the demo's reasoning closes here
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and len(uses) == 1
    assert uses[0].name == "get_weather" and set(uses[0].input) == {"city", "days"}
    assert isinstance(uses[0].input["city"], str) and isinstance(uses[0].input["days"], int)
    assert not [b for b in m.content if b.type == "text" and b.text.strip()]


def test_bad_response_format_is_a_400(server):
    oa = openai_client(server, KEY)
    with pytest.raises(openai.BadRequestError, match="response_format type"):
        oa.chat.completions.create(model="step-demo", messages=ASK, max_tokens=4,
                                   response_format={"type": "xml"})  # type: ignore[arg-type]


def test_responses_text_format_gets_a_valid_object(server):
    """The Responses API's ``text.format`` json_schema goes through the same grammar (the SDK's parse helper)."""
    oa = openai_client(server, KEY)
    answered = 0
    for seed in SEEDS:
        r = oa.responses.parse(model="step-demo", input=ASK[0]["content"], text_format=Pet, temperature=1.0,
                               max_output_tokens=200, extra_body={"seed": seed})
        if not r.output_text:
            continue  # the reasoning did not close: no answer to mask
        assert isinstance(r.output_parsed, Pet), r.output_text
        answered += 1
        if answered == 2:
            break
    assert answered == 2
