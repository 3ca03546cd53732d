"""Step tool-call parsing: typed arguments, malformed tags, text around calls, every chunk boundary."""

import itertools

import pytest

from step35_mlx.tool_calls import ToolCall, ToolCallParser, convert_value, parse_tool_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
            "threshold": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "options": {"type": "object"},
            "note": {"type": ["string", "null"]},
            "maybe": {"type": ["integer", "null"]},
        },
        "required": ["city"],
    }}},
    {"name": "run_code", "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}},
]


def call(name, **args):
    return ToolCall(name, args)


def _canon(text, calls):
    return text, [(c.name, c.arguments) for c in calls]


CANONICAL = (
    "Let me look that up.\n"
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n"
    "<parameter=metric>\ntrue\n</parameter>\n"
    "<parameter=threshold>\n-1.5e2\n</parameter>\n"
    "<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n"
    "<parameter=options>\n{'unit': 'C', 'n': 2}\n</parameter>\n"
    "<parameter=note>\nnull\n</parameter>\n"
    "<parameter=maybe>\n7\n</parameter>\n"
    "</function>\n</tool_call>"
)
CANONICAL_ARGS = {"city": "Paris", "days": 3, "metric": True, "threshold": -150.0, "tags": ["a", "b"],
                  "options": {"unit": "C", "n": 2}, "note": None, "maybe": 7}

# (name, text, expected answer text, expected calls)
CASES = [
    ("canonical", CANONICAL, "Let me look that up.\n", [("get_weather", CANONICAL_ARGS)]),
    ("text after", "A<tool_call>\n<function=run_code>\n<parameter=code>\nprint(1)\n</parameter>\n</function>\n</tool_call>\nB",
     "A\nB", [("run_code", {"code": "print(1)"})]),
    ("multiline string value keeps inner newlines",
     "<tool_call>\n<function=run_code>\n<parameter=code>\n\ndef f():\n    return 1\n\n</parameter>\n</function>\n</tool_call>",
     "", [("run_code", {"code": "\ndef f():\n    return 1\n"})]),
    ("two calls and text between",
     "x<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>\nand\n"
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>y",
     "x\nand\ny", [("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Oslo", "days": 2})]),
    ("function with a space instead of =",
     "<tool_call>\n<function get_weather>\n<parameter=city>\nLima\n</parameter>\n</function>\n</tool_call>",
     "", [("get_weather", {"city": "Lima"})]),
    ("missing > on function and parameter",
     "<tool_call>\n<function=get_weather\n<parameter=city\nLima\n</parameter>\n<parameter=days\n5\n</parameter>\n</function>\n</tool_call>",
     "", [("get_weather", {"city": "Lima", "days": 5})]),
    ("missing = on parameter",
     "<tool_call>\n<function=get_weather>\n<parameter city>\nLima\n</parameter>\n</function>\n</tool_call>",
     "", [("get_weather", {"city": "Lima"})]),
    ("missing </parameter> before the next parameter and before </function>",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nKyiv\n<parameter=days>\n4\n</function>\n</tool_call>",
     "", [("get_weather", {"city": "Kyiv", "days": 4})]),
    ("missing </function>",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nBern\n</parameter>\n</tool_call>done",
     "done", [("get_weather", {"city": "Bern"})]),
    ("missing </tool_call> at end of generation",
     "ok <tool_call>\n<function=get_weather>\n<parameter=city>\nBern\n</parameter>\n</function>\n",
     "ok ", [("get_weather", {"city": "Bern"})]),
    ("missing </tool_call> before the next <tool_call>",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n</function>\n"
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nB\n</parameter>\n</function>\n</tool_call>",
     "", [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})]),
    ("bad typed value stays a string",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nX\n</parameter>\n<parameter=days>\nthree\n</parameter>\n"
     "<parameter=tags>\nnot a list\n</parameter>\n</function>\n</tool_call>",
     "", [("get_weather", {"city": "X", "days": "three", "tags": "not a list"})]),
    ("unknown tool and parameter: strings",
     "<tool_call>\n<function=other>\n<parameter=n>\n5\n</parameter>\n</function>\n</tool_call>",
     "", [("other", {"n": "5"})]),
    ("no arguments", "<tool_call>\n<function=run_code>\n</function>\n</tool_call>", "", [("run_code", {})]),
    ("a block without a function is kept as text",
     "see <tool_call>nothing</tool_call> here", "see <tool_call>nothing</tool_call> here", []),
    ("tag-like text is not a call", "use <tool_calls> or <tool_ or <tool_call_x>", "use <tool_calls> or <tool_ or <tool_call_x>", []),
    ("ends in a partial tag", "text <tool_ca", "text <tool_ca", []),
    ("plain", "just an answer", "just an answer", []),
]


def _stream(chunks, tools=TOOLS):
    p = ToolCallParser(tools)
    events = []
    for c in chunks:
        events += p.feed(c)
    events += p.finish()
    text = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert text == p.text and calls == p.calls
    return _canon(text, calls)


@pytest.mark.parametrize("name,text,answer,calls", CASES, ids=[c[0] for c in CASES])
def test_one_shot(name, text, answer, calls):
    assert _canon(*parse_tool_calls(text, TOOLS)) == (answer, calls)


@pytest.mark.parametrize("name,text,answer,calls", CASES, ids=[c[0] for c in CASES])
def test_every_chunk_boundary(name, text, answer, calls):
    expected = (answer, calls)
    for i in range(len(text) + 1):
        assert _stream([text[:i], text[i:]]) == expected, i
    assert _stream(list(text)) == expected


def test_every_pair_of_boundaries_on_a_short_call():
    text = "a<tool_call>\n<function=f>\n<parameter=k>\n1\n</parameter>\n</function>\n</tool_call>b"
    expected = ("ab", [("f", {"k": "1"})])
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        assert _stream([text[:i], text[i:j], text[j:]]) == expected, (i, j)


def test_text_streams_out_before_the_call_completes():
    p = ToolCallParser(TOOLS)
    assert p.feed("Checking the weather") == ["Checking the weather"]
    assert p.feed(" now <tool") == [" now "]  # "<tool" may start a call: held back
    assert p.feed("_call>\n<function=get_weather>\n") == []
    events = p.feed("<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call> Done")
    assert [type(e) for e in events] == [ToolCall, str]
    assert events[0].name == "get_weather" and events[0].arguments == {"city": "Paris"}
    assert events[1] == " Done"
    assert events[0].to_dict() == {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@pytest.mark.parametrize("raw,schema,expected", [
    ("42", {"type": "integer"}, 42),
    (" 42 ", {"type": "integer"}, 42),
    ("4.0", {"type": "integer"}, 4),
    ("4.5", {"type": "integer"}, "4.5"),
    ("3", {"type": "number"}, 3),
    ("2.5", {"type": "number"}, 2.5),
    ("True", {"type": "boolean"}, True),
    ("false", {"type": "boolean"}, False),
    ("yes", {"type": "boolean"}, "yes"),
    ("None", {"type": "null"}, None),
    ("[1, 2]", {"type": "array"}, [1, 2]),
    ("(1, 2)", {"type": "array"}, [1, 2]),
    ("{\"a\": [1, {\"b\": null}]}", {"type": "object"}, {"a": [1, {"b": None}]}),
    ("{'a': True}", {"type": "object"}, {"a": True}),
    ("[1, 2]", {"type": "object"}, "[1, 2]"),
    ("007", {"type": "string"}, "007"),
    ("12", None, "12"),
    ("12", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 12),
    ("null", {"type": ["integer", "null"]}, None),
    ("2", {"enum": [1, 2, 3]}, 2),
])
def test_convert_value(raw, schema, expected):
    got = convert_value(raw, schema)
    assert got == expected and type(got) is type(expected)
