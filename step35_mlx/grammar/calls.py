"""The grammar of Step's XML tool calls (``<tool_call>`` / ``<function=NAME>`` / ``<parameter=KEY>``).

Values are written the way the chat template renders them: strings raw (no quotes), anything
else as JSON. A raw string is one lazy lexeme that ends at ``\\n</parameter>\\n``; it never
contains the tags the parser (:mod:`step35_mlx.tool_calls`) splits on, and its ``minLength`` /
``maxLength``, ``pattern`` (searched anywhere unless anchored with ``^`` / ``$``, as JSON
Schema and llguidance's JSON support read it) and common ``format`` s hold. String
``enum`` / ``const`` choices are written raw; other values go through llguidance's JSON
schema support.
"""

from __future__ import annotations

import json

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A raw string may not hold a tag the tool-call parser would split on.
NO_TAGS = r"~/(.|\n)*<\/?(parameter|function|tool_call)(.|\n)*/"
ANY = r"(.|\n)*"

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# days per month (February up to 29: leap years are not a regular language worth the states)
_DATE = (r"[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         r"|02-(0[1-9]|1[0-9]|2[0-9]))")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_ATOM = r"[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HEX = "[0-9a-fA-F]"
# RFC 3339 for the dates and times, RFC 5321 dot-atom mailboxes, RFC 4122 text form, dotted quads.
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}[Tt]{_TIME}",
    "email": f"{_ATOM}(\\.{_ATOM})*@({_LABEL}\\.)*{_LABEL}",
    "uuid": f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}",
    "ipv4": f"{_OCTET}(\\.{_OCTET}){{3}}",
}


def _literal(text: str, added: dict[str, int]) -> str:
    """A grammar literal; a tag that is one added token of the tokenizer must be matched as that token."""
    if text in added:
        return f"<[{added[text]}]>"
    return json.dumps(text)


def json_value(schema: dict) -> str:
    """llguidance's JSON-schema lexeme: compact JSON as json.dumps writes it (free spaces let a model pad forever)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def pattern_regex(pattern: str) -> str:
    """A JSON Schema ``pattern`` (ECMA syntax, matched anywhere) as a whole-string llguidance regex."""
    import llguidance

    head, tail = ANY, ANY
    if pattern.startswith("^"):
        pattern, head = pattern[1:], ""
    if pattern.endswith("$"):
        body = pattern[:-1]
        if (len(body) - len(body.rstrip("\\"))) % 2 == 0:  # not an escaped "\$"
            pattern, tail = body, ""
    return f"{head}({llguidance.regex_to_lark(pattern, 'dw')}){tail}"


def raw_string(schema: dict) -> str:
    """The lexeme of a raw string value with its closing tag (lengths, ``pattern`` and ``format`` enforced)."""
    parts = [f"/{ANY}/", NO_TAGS]
    lo, hi = schema.get("minLength"), schema.get("maxLength")
    if isinstance(lo, int) or isinstance(hi, int):
        parts.append(f"/(.|\\n){{{int(lo or 0)},{int(hi) if isinstance(hi, int) else ''}}}/")
    if isinstance(schema.get("pattern"), str):
        parts.append(f"/{pattern_regex(schema['pattern'])}/")
    if schema.get("format") in FORMATS:
        parts.append(f"/{FORMATS[schema['format']]}/")
    return f"[lazy]: ({' & '.join(parts)}) /\\n<\\/parameter>\\n/"


def _is_raw_string(schema: dict) -> bool:
    return schema.get("type") == "string" and not {"enum", "const"} & schema.keys()


def param_value(schema: dict) -> str:
    """Right-hand side of a parameter's value rule (with the closing tag), as the template renders it."""
    if _is_raw_string(schema):
        return raw_string(schema)
    choices = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if isinstance(choices, list) and choices and all(isinstance(v, str) for v in choices):
        values = " | ".join(json.dumps(v) for v in choices)  # string choices are written raw
    else:
        values = json_value(schema)
    return f': ({values}) "\\n</parameter>\\n"'


def tool_call_grammar(tools: dict[str, dict], added: dict[str, int], many: bool, lead: bool = True,
                      rule: str = "start") -> str:
    """Lark grammar of Step's XML tool calls of ``tools`` (``{name: parameters schema}``), rooted at ``rule``.

    Parameters come in the schema's ``properties`` order, required ones always, optional
    ones optionally; ``many``: one or more calls (a newline between two is optional: the
    template writes none), else exactly one; ``lead``: an optional newline before the first call
    (the one the template puts after ``</think>``).
    """
    calls = 'call ("\\n"? call)*' if many else "call"
    lines = [f"{rule}: " + ('"\\n"? ' if lead else "") + calls,
             f'call: {_literal("<tool_call>", added)} "\\n" fn "</function>\\n" {_literal("</tool_call>", added)}',
             "fn: " + " | ".join(f"f{i}" for i in range(len(tools)))]
    for i, (name, schema) in enumerate(tools.items()):
        props = schema.get("properties") if isinstance(schema, dict) else None
        props = props if isinstance(props, dict) else {}
        required = set(schema.get("required") or []) if isinstance(schema, dict) else set()
        parts = []
        for j, (pname, pschema) in enumerate(props.items()):
            rule = f"f{i}p{j}"
            lines.append(f'{rule}: {json.dumps(f"<parameter={pname}>")} "\\n" {rule}v')
            lines.append(f"{rule}v{param_value(pschema if isinstance(pschema, dict) else {})}")
            parts.append(rule if pname in required else rule + "?")
        lines.append(f'f{i}: {json.dumps(f"<function={name}>")} "\\n" ' + " ".join(parts))
    return "\n".join(lines) + "\n"
