"""Constrained decoding (step35_mlx.grammar): JSON schemas and forced tool calls on the demo model,
plain and MTP decoding, the reasoning gate and rollback of the grammar state."""

import json

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("llguidance")

from step35_mlx import load  # noqa: E402
from step35_mlx.generate import generate, new_cache, stream_generate  # noqa: E402
from step35_mlx.grammar import Constraint, constraint_for, grammar_processor  # noqa: E402
from step35_mlx.sampling import SamplingParams  # noqa: E402
from step35_mlx.speculative import speculative_tokens  # noqa: E402

try:
    import jsonschema
except ImportError:  # the hand checks below still run
    jsonschema = None

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"age": {"type": "integer"}, "city": {"type": "string", "maxLength": 10}},
                  "required": ["age", "city"], "additionalProperties": False},
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"type": "string", "enum": ["c", "f"]},
                   "days": {"type": "integer"}},
    "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "local"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def check_pet(value):
    """The PET schema checked by hand (and by jsonschema when it is installed)."""
    assert set(value) == {"name", "kind", "tags", "owner"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert value["kind"] in ("cat", "dog", "bird")
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 8 for t in value["tags"])
    owner = value["owner"]
    assert set(owner) == {"age", "city"}
    assert isinstance(owner["age"], int) and not isinstance(owner["age"], bool)
    assert isinstance(owner["city"], str) and len(owner["city"]) <= 10
    if jsonschema is not None:
        jsonschema.validate(value, PET)


def test_json_schema_samples_parse_and_validate(demo):
    model, tok = demo
    plain = generate(model, tok, "The weather today", max_tokens=40, temperature=1.0, seed=0)
    with pytest.raises(ValueError):
        json.loads(plain)  # unconstrained, the demo writes prose: the mask is what makes the JSON
    for seed in range(20):
        chunks = list(stream_generate(model, tok, "The weather today", max_tokens=120, temperature=1.0, seed=seed,
                                      response_format=PET_FORMAT))
        assert chunks[-1].finish_reason == "stop"
        check_pet(json.loads("".join(c.text for c in chunks)))


def test_json_object_is_an_object(demo):
    model, tok = demo
    for seed in range(3):
        out = generate(model, tok, "def main():", max_tokens=200, temperature=0.7, seed=seed,
                       response_format={"type": "json_object"})
        assert isinstance(json.loads(out), dict)


@pytest.mark.parametrize("prompt", ["The weather today", "def main():"])
def test_mtp_greedy_equals_plain_greedy_constrained(demo, prompt):
    model, tok = demo
    plain = generate(model, tok, prompt, max_tokens=80, temperature=0, response_format=PET_FORMAT, mtp=False)
    check_pet(json.loads(plain))
    for depth in (1, 2, 3):
        spec = generate(model, tok, prompt, max_tokens=80, temperature=0, response_format=PET_FORMAT,
                        mtp=True, draft_depth=depth)
        assert spec == plain, depth


def test_mtp_sampled_constrained_outputs_validate(demo):
    model, tok = demo
    for seed in range(4):
        out = generate(model, tok, "The weather today", max_tokens=120, temperature=1.0, seed=seed,
                       response_format=PET_FORMAT, mtp=True, draft_depth=3)
        check_pet(json.loads(out))


def test_mtp_draft_vocabulary_without_allowed_tokens_stays_exact(demo):
    """Drafts over ids 0..39 (where the grammar allows almost nothing): drafts fall back to unmasked, verify rejects."""
    model, tok = demo
    eos = frozenset(model.config.eos_token_id)
    prompt = mx.array(tok.encode("The weather today"), dtype=mx.int32)
    for seed in range(3):
        proc = grammar_processor(constraint_for(PET_FORMAT), tok, vocab_size=model.config.vocab_size, eos_ids=eos,
                                 start=prompt.size, reasoning=False)
        gen = speculative_tokens(model, new_cache(model), prompt, SamplingParams(temperature=1.0), depth=2,
                                 key=mx.random.key(seed), logits_processors=[proc], draft_vocab=mx.arange(40))
        out = []
        for t in gen:
            if t in eos or len(out) > 150:
                break
            out.append(t)
        gen.close()
        check_pet(json.loads(tok.decode(out)))


def _answer_prompt(tok, tools):
    """A chat prompt whose reasoning is already closed, so the reply is the answer."""
    ids = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris for 3 days?"}], tools=tools,
                                  add_generation_prompt=True)
    return list(ids) + tok.encode("The user wants the weather.\n</think>\n", add_special_tokens=False)


@pytest.mark.parametrize("mtp", [False, True])
def test_forced_tool_call_parses_against_its_schema(demo, mtp):
    model, tok = demo
    tools = [WEATHER, CLOCK]
    for seed in range(2):
        chunks = list(stream_generate(model, tok, _answer_prompt(tok, tools), tools=tools, max_tokens=150,
                                      temperature=1.0, seed=seed, mtp=mtp,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        calls = [c for ch in chunks for c in ch.tool_calls]
        assert chunks[-1].finish_reason == "stop" and len(calls) == 1
        args = calls[0].arguments
        assert calls[0].name == "get_weather" and set(args) <= {"city", "unit", "days"}
        assert isinstance(args["city"], str) and len(args["city"]) <= 16
        assert isinstance(args["days"], int) and args.get("unit", "c") in ("c", "f")
        assert "".join(ch.content for ch in chunks).strip() == ""


def test_required_tool_choice_calls_some_tool(demo):
    model, tok = demo
    tools = [WEATHER, CLOCK]
    chunks = list(stream_generate(model, tok, _answer_prompt(tok, tools), tools=tools, max_tokens=200,
                                  temperature=1.0, seed=0, tool_choice="required"))
    calls = [c for ch in chunks for c in ch.tool_calls]
    if chunks[-1].finish_reason == "length":  # the demo keeps calling (one or more calls are allowed)
        calls = calls[:-1]  # the last one was cut by max_tokens
    assert len(calls) >= 2
    for c in calls:
        if c.name == "get_time":
            assert list(c.arguments) == ["zone"] and c.arguments["zone"] in ("utc", "local")
        else:
            assert c.name == "get_weather" and isinstance(c.arguments["days"], int)


def _finite(row: mx.array) -> np.ndarray:
    return np.nonzero(np.array(mx.isfinite(row)).reshape(-1))[0]


def test_mask_starts_after_think_and_rolls_back(demo):
    model, tok = demo
    V = model.config.vocab_size
    eos = frozenset(model.config.eos_token_id)
    c = constraint_for({"type": "json_object"})
    proc = grammar_processor(c, tok, vocab_size=V, eos_ids=eos, start=2, reasoning=True)
    logits = mx.zeros((1, V))
    think_close = tok.encode("</think>", add_special_tokens=False)
    assert len(think_close) == 1
    reasoning = [0, 3] + tok.encode("I think {", add_special_tokens=False)
    # reasoning rows pass unchanged but for the end tokens: a JSON value is pending, so the reply cannot end here
    assert set(range(V)) - set(_finite(proc(mx.array(reasoning), logits)).tolist()) == set(eos)
    answer = tok.encode('{"a": [1, 2]', add_special_tokens=False)
    ctx = reasoning + think_close + answer
    masked = _finite(proc(mx.array(ctx), logits))
    assert 0 < masked.size < V
    fresh = grammar_processor(c, tok, vocab_size=V, eos_ids=eos, start=2, reasoning=True)
    short = ctx[:-2]
    np.testing.assert_array_equal(_finite(proc(mx.array(short), logits)), _finite(fresh(mx.array(short), logits)))
    np.testing.assert_array_equal(_finite(proc(mx.array(ctx), logits)), masked)  # forward again after the rollback
    done = ctx + tok.encode("}", add_special_tokens=False)
    assert set(_finite(proc(mx.array(done), logits)).tolist()) == set(eos)  # complete: only eos


def test_bad_options_are_value_errors(demo):
    model, tok = demo
    with pytest.raises(ValueError, match="response_format type"):
        generate(model, tok, "hi", max_tokens=2, response_format={"type": "xml"})
    with pytest.raises(ValueError, match="unknown tool"):
        generate(model, tok, "hi", max_tokens=2, tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"})
    with pytest.raises(ValueError, match="no tools"):
        generate(model, tok, "hi", max_tokens=2, tool_choice="required")
    assert constraint_for({"type": "text"}, [WEATHER], "none") is None
    assert constraint_for({"type": "text"}, [WEATHER], "auto").auto


def test_chat_reply_reasons_freely_then_answers_in_schema(demo):
    model, tok = demo
    msgs = [{"role": "user", "content": "Give me a pet as JSON"}]
    for seed in (1, 2, 3):  # seeds whose reasoning closes within the budget
        free = list(stream_generate(model, tok, msgs, max_tokens=200, temperature=1.0, seed=seed))
        con = list(stream_generate(model, tok, msgs, max_tokens=200, temperature=1.0, seed=seed,
                                   response_format=PET_FORMAT))
        ids = [c.token_ids[0] for c in free]
        end = ids.index(tok.encode("</think>", add_special_tokens=False)[0]) + 1
        assert [c.token_ids[0] for c in con][:end] == ids[:end]  # no mask inside the reasoning
        assert "".join(c.reasoning for c in con) == "".join(c.reasoning for c in free)
        check_pet(json.loads("".join(c.content for c in con)))


def test_constraint_options_and_json_form():
    forced = constraint_for(None, [WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}})
    assert list(forced.tools) == ["get_time"] and not forced.many_calls
    anthropic = constraint_for(None, [WEATHER, CLOCK], {"type": "tool", "name": "get_weather"})
    assert list(anthropic.tools) == ["get_weather"] and not anthropic.many_calls
    for choice in ("required", {"type": "any"}):
        any_tool = constraint_for({"type": "json_object"}, [WEATHER, CLOCK], choice)  # forcing wins
        assert list(any_tool.tools) == ["get_weather", "get_time"] and any_tool.many_calls and any_tool.schema is None
    schema = constraint_for(PET_FORMAT, [WEATHER], {"type": "auto"})  # the JSON value, or calls
    assert schema.schema == PET and list(schema.tools) == ["get_weather"] and not schema.auto
    assert not constraint_for(PET_FORMAT, [WEATHER], "none").tools
    assert Constraint.coerce(json.loads(json.dumps(forced.to_dict()))) == forced


def test_tool_grammar_writes_string_choices_raw_and_other_values_as_json(demo):
    model, tok = demo
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "u": {"enum": ["c", "f"]}, "k": {"const": "x"}, "n": {"enum": [1, 2]}, "o": {"type": "object"}},
        "required": ["u", "k", "n"]}}}]
    eos = frozenset(model.config.eos_token_id)

    def accepts(text: str) -> bool:
        proc = grammar_processor(constraint_for(None, tools, "required"), tok, vocab_size=model.config.vocab_size,
                                 eos_ids=eos, start=0, reasoning=False)
        return proc.sync(tok.encode(text, add_special_tokens=False)) and proc.matcher.is_accepting()

    def call(u: str, k: str, n: str, o: str = "") -> str:
        extra = f"<parameter=o>\n{o}\n</parameter>\n" if o else ""
        return (f"<tool_call>\n<function=f>\n<parameter=u>\n{u}\n</parameter>\n<parameter=k>\n{k}\n</parameter>\n"
                f"<parameter=n>\n{n}\n</parameter>\n{extra}</function>\n</tool_call>")

    assert accepts(call("f", "x", "2")) and accepts(call("c", "x", "1", '{"a": 1}'))
    assert not accepts(call('"f"', "x", "2"))  # string choices are raw, as the template renders them
    assert not accepts(call("f", "y", "2")) and not accepts(call("f", "x", "3"))
    assert not accepts(call("f", "x", "2", "[1]"))  # o must be an object
    assert not accepts(call("f", "x", "2")[:-12])  # unfinished
