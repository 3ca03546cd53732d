"""Tool calls under the grammar through the server, with the official clients: tool_choice auto (the model's
own call), parallel_tool_calls false / disable_parallel_tool_use, a pattern and a format on string arguments,
and response_format on /v1/completions."""

from __future__ import annotations

import datetime
import json
import re

import pytest

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

from step35_mlx.loader import load  # noqa: E402
from step35_mlx.server import create_app  # noqa: E402
from scriptkit import force_prefix  # noqa: E402
from serverkit import live_server  # noqa: E402

KEY = "test-key"
CODE = "^[A-Z]{3}-[0-9]{2}$"
PARAMS = {"type": "object", "properties": {"code": {"type": "string", "pattern": CODE},
                                           "day": {"type": "string", "format": "date"}},
          "required": ["code", "day"]}
BOOK = {"type": "function", "function": {"name": "book", "description": "Book a table", "parameters": PARAMS}}
ASK = [{"role": "user", "content": "Book a table"}]
OPEN = "Booking.\n</think>\n<tool_call>"  # scripted up to the opener; the model writes the call under the grammar
OBJECT = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 30}},
          "required": ["kind", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    model, tok = load("demo")
    app = create_app(model, tok, model_name="step-demo", api_key=KEY, max_queue=8)
    with live_server(app) as url:
        yield {"url": url, "tok": tok}


@pytest.fixture
def oa(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def check_args(args: dict) -> None:
    assert set(args) == {"code", "day"} and re.fullmatch(CODE[1:-1], args["code"])
    datetime.date.fromisoformat(args["day"])


def test_required_without_parallel_gives_one_valid_call(oa):
    for seed in range(3):  # reasoning_effort minimal: the reasoning closes at once, so every seed answers
        r = oa.chat.completions.create(model="step-demo", messages=ASK, tools=[BOOK], tool_choice="required",
                                       parallel_tool_calls=False, reasoning_effort="minimal", seed=seed,
                                       temperature=1.0, max_tokens=80)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        check_args(json.loads(choice.message.tool_calls[0].function.arguments))


def test_auto_call_the_model_opens_parses(server, oa, monkeypatch):
    force_prefix(monkeypatch, server["tok"], OPEN)
    r = oa.chat.completions.create(model="step-demo", messages=ASK, tools=[BOOK], parallel_tool_calls=False,
                                   seed=0, temperature=1.0, max_tokens=80)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1 and not msg.content
    check_args(json.loads(msg.tool_calls[0].function.arguments))
    events = list(oa.chat.completions.create(model="step-demo", messages=ASK, tools=[BOOK], seed=1, temperature=1.0,
                                             max_tokens=80, parallel_tool_calls=False, stream=True))
    calls = [c for e in events if e.choices for c in (e.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and events[-1].choices[0].finish_reason == "tool_calls"
    check_args(json.loads(calls[0].function.arguments))


def test_anthropic_without_parallel_tool_use(server, monkeypatch):
    force_prefix(monkeypatch, server["tok"], OPEN)
    an = anthropic.Anthropic(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)
    for kind in ("auto", "any"):
        m = an.messages.create(model="step-demo", max_tokens=80, messages=ASK,
                               tools=[{"name": "book", "input_schema": PARAMS}],
                               tool_choice={"type": kind, "disable_parallel_tool_use": True})
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "book"
        check_args(uses[0].input)


def test_responses_parallel_tool_calls_false(oa):
    r = oa.responses.create(model="step-demo", input="Book a table", temperature=1.0, max_output_tokens=80,
                            tools=[{"type": "function", "name": "book", "parameters": PARAMS, "strict": True}],
                            tool_choice="required", parallel_tool_calls=False, reasoning={"effort": "minimal"},
                            extra_body={"seed": 0})
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "book"
    check_args(json.loads(calls[0].arguments))


def test_completions_response_format(oa):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": OBJECT, "strict": True}}
    r = oa.completions.create(model="step-demo", prompt="The weather today", max_tokens=60, temperature=1.0, seed=0,
                              extra_body={"response_format": fmt})
    value = json.loads(r.choices[0].text)
    assert value["kind"] in ("cat", "dog") and 0 <= value["age"] <= 30 and set(value) == {"kind", "age"}
    parts = oa.completions.create(model="step-demo", prompt="def main():", max_tokens=60, temperature=1.0, seed=1,
                                  stream=True, extra_body={"response_format": fmt})
    assert set(json.loads("".join(c.choices[0].text for c in parts if c.choices))) == {"kind", "age"}
    with pytest.raises(openai.BadRequestError, match="response_format type"):
        oa.completions.create(model="step-demo", prompt="x", max_tokens=2,
                              extra_body={"response_format": {"type": "xml"}})
