"""Tool calls under constrained decoding: ``tool_choice`` auto (the grammar switches on at the model's own
``<tool_call>``), ``parallel_tool_calls=False``, and raw string values with ``pattern`` / ``format``."""

import datetime
import json
import re
import uuid

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("llguidance")

from step35_mlx import load  # noqa: E402
from step35_mlx.generate import stream_generate  # noqa: E402
from step35_mlx.grammar import constraint_for, grammar_processor  # noqa: E402
from step35_mlx.grammar.auto import AutoToolProcessor  # noqa: E402
from scriptkit import force_prefix  # noqa: E402

CODE = "^[A-Z]{3}-[0-9]{2}$"
BOOK = {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
    "code": {"type": "string", "pattern": CODE}, "day": {"type": "string", "format": "date"},
    "seats": {"type": "integer", "minimum": 1, "maximum": 20}}, "required": ["code", "day"]}}}
ASK = [{"role": "user", "content": "Book a table"}]
OPEN = "Booking.\n</think>\nSure.<tool_call>"  # scripted up to the opener; the model writes the call


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def check_book(call):
    assert call.name == "book" and set(call.arguments) <= {"code", "day", "seats"}
    assert re.fullmatch(CODE[1:-1], call.arguments["code"])
    datetime.date.fromisoformat(call.arguments["day"])  # raises when it is not a date
    assert 1 <= call.arguments.get("seats", 1) <= 20


def ids_of(chunks):
    return [c.token_ids[0] for c in chunks]


def chat_prompt(tok, answer: bool = False):
    """Token ids of a short chat prompt (the tools are not rendered: the demo cannot read them anyway);
    ``answer``: with the reasoning already closed, so every generated token is answer text."""
    ids = list(tok.apply_chat_template(ASK, add_generation_prompt=True))
    return ids + (tok.encode("Book it.\n</think>\n", add_special_tokens=False) if answer else [])


def test_auto_leaves_free_text_exactly_as_unconstrained(demo):
    model, tok = demo
    eos = frozenset(model.config.eos_token_id)
    proc = grammar_processor(constraint_for(None, [BOOK]), tok, vocab_size=model.config.vocab_size, eos_ids=eos,
                             start=0, reasoning=False)
    assert isinstance(proc, AutoToolProcessor)  # auto is on by default with llguidance installed
    for seed, mtp in ((0, False), (2, True)):
        kw = dict(tools=[BOOK], max_tokens=30, temperature=1.0, seed=seed, mtp=mtp)
        auto = list(stream_generate(model, tok, chat_prompt(tok, answer=True), **kw))
        free = list(stream_generate(model, tok, chat_prompt(tok, answer=True), tool_choice="none", **kw))
        assert ids_of(auto) == ids_of(free) and tok.convert_tokens_to_ids("<tool_call>") not in ids_of(free)
        assert "".join(c.content for c in free).strip()  # answer text, not reasoning


def test_auto_call_the_model_opens_is_valid_plain_and_mtp(demo, monkeypatch):
    model, tok = demo
    force_prefix(monkeypatch, tok, OPEN)
    greedy = None
    for seed, mtp in ((0, False), (None, False), (None, True)):
        chunks = list(stream_generate(model, tok, chat_prompt(tok), tools=[BOOK], max_tokens=80,
                                      temperature=0 if seed is None else 1.0, seed=seed, mtp=mtp,
                                      draft_depth=2 if mtp else None, parallel_tool_calls=False))
        calls = [c for ch in chunks for c in ch.tool_calls]
        assert chunks[-1].finish_reason == "stop" and len(calls) == 1  # one call, then the end of the turn
        check_book(calls[0])
        assert "".join(ch.content for ch in chunks) == "Sure."  # the free text before the call
        if seed is None:
            greedy = greedy or ids_of(chunks)
            assert ids_of(chunks) == greedy  # greedy MTP == greedy plain, constrained
    unconstrained = list(stream_generate(model, tok, chat_prompt(tok), tools=[BOOK], max_tokens=40, temperature=1.0,
                                         seed=0, tool_choice="none"))
    assert not [c for ch in unconstrained for c in ch.tool_calls]  # without the grammar the demo writes no call


def _finite(row: mx.array) -> np.ndarray:
    return np.nonzero(np.array(mx.isfinite(row)).reshape(-1))[0]


def test_response_format_beside_auto_tools_answers_json_or_calls(demo, monkeypatch):
    model, tok = demo
    pet = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"],
           "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": pet}}
    kw = dict(tools=[BOOK], response_format=fmt, max_tokens=60, temperature=1.0, seed=0, parallel_tool_calls=False)
    chunks = list(stream_generate(model, tok, chat_prompt(tok, answer=True), **kw))
    assert json.loads("".join(c.content for c in chunks))["kind"] in ("cat", "dog")
    assert not [c for ch in chunks for c in ch.tool_calls]
    force_prefix(monkeypatch, tok, "<tool_call>")  # the answer opens a call instead
    chunks = list(stream_generate(model, tok, chat_prompt(tok, answer=True), **kw))
    calls = [c for ch in chunks for c in ch.tool_calls]
    assert len(calls) == 1 and chunks[-1].finish_reason == "stop" and not "".join(c.content for c in chunks).strip()
    check_book(calls[0])


def test_free_text_may_not_spell_the_opener(demo):
    model, tok = demo
    V = model.config.vocab_size
    proc = grammar_processor(constraint_for(None, [BOOK]), tok, vocab_size=V,
                             eos_ids=frozenset(model.config.eos_token_id), start=0, reasoning=False)
    logits = mx.zeros((1, V))
    text = tok.encode("see it", add_special_tokens=False)
    assert proc(mx.array(text), logits) is logits  # free text: untouched
    spelled = tok.encode("see <tool_call", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<tool_call>") not in spelled
    allowed = set(_finite(proc(mx.array(spelled), logits)).tolist())
    for piece, ok in ((">", False), (" x", False), ("\n", False), ("s", True), ("x", True)):
        first = tok.encode(piece, add_special_tokens=False)[0]
        assert (first in allowed) == ok, piece
    opened = text + [tok.convert_tokens_to_ids("<tool_call>")]
    assert _finite(proc(mx.array(opened), logits)).tolist() == tok.encode("\n", add_special_tokens=False)


def test_after_a_call_only_another_call_or_the_end(demo):
    model, tok = demo
    V, eos = model.config.vocab_size, frozenset(model.config.eos_token_id)
    opener = tok.convert_tokens_to_ids("<tool_call>")
    call = tok.encode("Sure.<tool_call>\n<function=book>\n<parameter=code>\nABC-12\n</parameter>\n<parameter=day>\n"
                      "2024-01-02\n</parameter>\n</function>\n</tool_call>", add_special_tokens=False)
    for parallel, want in ((True, eos | {opener} | set(tok.encode("\n", add_special_tokens=False))), (False, eos)):
        proc = grammar_processor(constraint_for(None, [BOOK], None, parallel), tok, vocab_size=V, eos_ids=eos,
                                 start=0, reasoning=False)
        assert set(_finite(proc(mx.array(call), mx.zeros((1, V)))).tolist()) == want


def _accepts(model, tok, tools, text):
    proc = grammar_processor(constraint_for(None, tools, "required"), tok, vocab_size=model.config.vocab_size,
                             eos_ids=frozenset(model.config.eos_token_id), start=0, reasoning=False)
    return proc.sync(tok.encode(text, add_special_tokens=False)) and proc.matcher.is_accepting()


@pytest.mark.parametrize("schema, good, bad", [
    ({"type": "string", "pattern": CODE}, ["ABC-12"], ["ABC-123", "abc-12", "xABC-12", "ABC-12\n"]),
    ({"type": "string", "pattern": "[0-9]+"}, ["a1b", "7"], ["ab", ""]),  # unanchored: found anywhere
    ({"type": "string", "pattern": "^a\\$"}, ["a$", "a$b"], ["a", "ba$"]),  # an escaped $ is no anchor
    ({"type": "string", "pattern": "^a.c$", "maxLength": 3}, ["abc"], ["ac", "a\nc"]),
    ({"type": "string", "pattern": "^\\d+$", "minLength": 2, "maxLength": 3}, ["12", "123"], ["1", "1234", "1a"]),
    ({"type": "string", "format": "date"}, ["2024-02-29", "1999-12-31"], ["2024-02-30", "2024-04-31", "24-01-01"]),
    ({"type": "string", "format": "time"}, ["23:59:60Z", "01:02:03.5+02:00"], ["01:02:03", "24:00:00Z"]),
    ({"type": "string", "format": "date-time"}, ["2024-01-02T03:04:05Z"], ["2024-01-02 03:04:05Z", "2024-01-02"]),
    ({"type": "string", "format": "email"}, ["a.b@c.io", "x@host"], ["a..b@c.io", "a@-b.io", "ab"]),
    ({"type": "string", "format": "uuid"}, [str(uuid.UUID(int=7))], ["1234", str(uuid.UUID(int=7))[:-1]]),
    ({"type": "string", "format": "ipv4"}, ["10.0.0.255"], ["256.1.1.1", "01.2.3.4", "1.2.3"]),
    ({"type": "string"}, ["a\nb", "x<y"], ["a<parameter=k>b", "a</function>", "<tool_call>", "a</tool_call>"]),
])
def test_raw_string_values(demo, schema, good, bad):
    model, tok = demo
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": schema}, "required": ["s"]}}}]

    def call(value):
        return f"<tool_call>\n<function=f>\n<parameter=s>\n{value}\n</parameter>\n</function>\n</tool_call>"

    for value in good:
        assert _accepts(model, tok, tools, call(value)), value
    for value in bad:
        assert not _accepts(model, tok, tools, call(value)), value


def test_auto_without_a_usable_grammar_stays_unconstrained(demo):
    model, tok = demo
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "(?=a)b"}}}}}]  # a lookahead
    eos = frozenset(model.config.eos_token_id)
    assert grammar_processor(constraint_for(None, tools), tok, vocab_size=model.config.vocab_size, eos_ids=eos,
                             start=0, reasoning=False) is None
    with pytest.raises(ValueError, match="does not compile"):
        grammar_processor(constraint_for(None, tools, "required"), tok, vocab_size=model.config.vocab_size,
                          eos_ids=eos, start=0, reasoning=False)
    assert constraint_for(None, [{"name": "g", "parameters": "not a schema"}]) is None


def test_without_llguidance_auto_is_unconstrained_and_forcing_is_a_400(monkeypatch):
    import sys

    from step35_mlx.server.constrain import request_constraint
    from step35_mlx.server.errors import APIError

    monkeypatch.setitem(sys.modules, "llguidance", None)  # find_spec (and import) now see no llguidance
    assert constraint_for(None, [BOOK]) is None and request_constraint(None, [BOOK], "auto", False) is None
    with pytest.raises(APIError, match="needs llguidance"):
        request_constraint(None, [BOOK], "required")
