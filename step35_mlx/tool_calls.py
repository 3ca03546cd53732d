"""Parse Step 3.5 tool calls out of the answer text, while it streams.

The format (from the released chat template)::

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

Arguments are typed by the tool's JSON schema (``integer``, ``number``, ``boolean``,
``null``, ``object``, ``array``; anything else, or an unknown parameter, stays a
string). One leading and one trailing newline of a value belong to the format and are
removed. Malformed tags seen in practice are tolerated: ``<function NAME>``,
``<function=NAME`` / ``<parameter=KEY`` without ``>`` at the end of a line, a missing
``</parameter>`` before the next ``<parameter=`` or ``</function>``, a missing
``</function>``, and a missing ``</tool_call>`` at the end of the generation (or before
the next ``<tool_call>``). Text before, between and after calls is passed on as answer
text; a ``<tool_call>`` block that holds no function is passed on verbatim.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

_OPEN_RE = re.compile(r"<tool_call(?:>|(?=\s))")
_CLOSE_RE = re.compile(r"</tool_call(?:>|(?=\s))")
_NAME_END = re.compile(r"[>\n<]")
_TAG_SEP = re.compile(r"[ \t=]*")


@dataclass
class ToolCall:
    """One parsed call: ``name`` and typed ``arguments``; ``raw`` is the block it came from."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""

    def to_dict(self) -> dict:
        """OpenAI-style ``{"type": "function", "function": {"name", "arguments"}}`` (what the template renders)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


Event = Union[str, ToolCall]


# ---------------------------------------------------------------- schemas and values


def tool_schemas(tools: Iterable[dict] | None) -> dict[str, dict]:
    """``{tool name: {param: schema}}`` from OpenAI-style (``{"type": "function", "function": {...}}``) or bare tool dicts."""
    out: dict[str, dict] = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            continue
        params = fn.get("parameters") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


def _schema_types(schema: dict | None) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    types: list[str] = []
    if isinstance(t, str):
        types.append(t)
    elif isinstance(t, list):
        types += [x for x in t if isinstance(x, str)]
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types += [x for x in _schema_types(sub) if x not in types]
    if not types and "enum" in schema:
        kinds = {type(v) for v in schema["enum"]}
        if kinds and kinds <= {int}:
            types.append("integer")
        elif kinds and kinds <= {int, float}:
            types.append("number")
        elif kinds and kinds <= {bool}:
            types.append("boolean")
    return types


def _literal(text: str) -> Any:
    """JSON first, then a Python literal (``True``, single quotes, tuples); raises ValueError."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(str(e)) from e


def _as_type(raw: str, kind: str) -> Any:
    """Convert ``raw`` to JSON-schema type ``kind``; raises ValueError when it is not one."""
    s = raw.strip()
    if kind == "string":
        return raw
    if kind == "null":
        if s.lower() in ("null", "none"):
            return None
        raise ValueError("not null")
    if kind == "boolean":
        if s.lower() in ("true", "false"):
            return s.lower() == "true"
        raise ValueError("not a boolean")
    if kind == "integer":
        try:
            return int(s)
        except ValueError:
            v = _literal(s)
            if isinstance(v, float) and v.is_integer():
                return int(v)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            raise ValueError("not an integer")
    if kind == "number":
        v = _literal(s)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
        raise ValueError("not a number")
    if kind in ("object", "array"):
        v = _literal(s)
        if kind == "object" and isinstance(v, dict):
            return v
        if kind == "array" and isinstance(v, (list, tuple)):
            return list(v)
        raise ValueError(f"not an {kind}")
    raise ValueError(f"unknown type {kind}")


def convert_value(raw: str, schema: dict | None) -> Any:
    """Type a parameter value by its JSON schema; strings (and anything that fails to convert) stay text."""
    types = _schema_types(schema)
    for kind in [t for t in types if t != "string"]:
        try:
            return _as_type(raw, kind)
        except ValueError:
            continue
    return raw


# ---------------------------------------------------------------- block parsing


def opens_call(text: str) -> bool:
    """Whether ``text`` holds what this parser reads as the start of a call (``<tool_call>`` or ``<tool_call`` + space)."""
    return _OPEN_RE.search(text) is not None


def _tag_value(text: str, start: int) -> tuple[str, int]:
    """Name after ``<function`` / ``<parameter`` at ``start``: skip ``=``/spaces, read to ``>``, newline or ``<``.

    Returns ``(name, index just after the tag)``; a missing ``>`` leaves the index at the newline.
    """
    start = _TAG_SEP.match(text, start).end()
    m = _NAME_END.search(text, start)
    end = m.start() if m else len(text)
    name = text[start:end].strip().strip("\"'")
    after = end + 1 if m and text[end] == ">" else end
    return name, after


def _find_first(text: str, start: int, needles: tuple[str, ...]) -> tuple[int, str | None]:
    best, which = len(text), None
    for n in needles:
        i = text.find(n, start)
        if 0 <= i < best:
            best, which = i, n
    return best, which


def _close_end(text: str, i: int, tag: str) -> int:
    """Index after a closing tag starting at ``i`` (tolerates a missing ``>``)."""
    j = i + len(tag)
    return j + 1 if text.startswith(">", j) else j


def _parse_params(body: str, schema: dict) -> dict[str, Any]:
    args: dict[str, Any] = {}
    pos = 0
    while True:
        i = body.find("<parameter", pos)
        if i < 0:
            return args
        key, vstart = _tag_value(body, i + len("<parameter"))
        vend, which = _find_first(body, vstart, ("</parameter", "<parameter"))
        raw = body[vstart:vend]
        if raw.startswith("\n"):
            raw = raw[1:]
        if raw.endswith("\n"):
            raw = raw[:-1]
        if key:
            args[key] = convert_value(raw, schema.get(key))
        pos = _close_end(body, vend, "</parameter") if which == "</parameter" else vend


def parse_block(block: str, schemas: dict[str, dict] | None = None) -> tuple[list[ToolCall], str]:
    """Calls inside one ``<tool_call>`` block body, and the non-whitespace text that is not part of any call."""
    schemas = schemas or {}
    calls: list[ToolCall] = []
    leftover: list[str] = []
    pos = 0
    while True:
        i = block.find("<function", pos)
        if i < 0:
            leftover.append(block[pos:])
            break
        leftover.append(block[pos:i])
        name, bstart = _tag_value(block, i + len("<function"))
        bend, which = _find_first(block, bstart, ("</function", "<function"))
        body = block[bstart:bend]
        pos = _close_end(block, bend, "</function") if which == "</function" else bend
        calls.append(ToolCall(name, _parse_params(body, schemas.get(name, {})), raw=block[i:pos]))
    extra = "".join(leftover)
    return calls, (extra if extra.strip() else "")


# ---------------------------------------------------------------- streaming


def _partial_open(text: str) -> int:
    """Length of a suffix of ``text`` that may still become ``<tool_call>`` (or ``<tool_call`` + space)."""
    for k in range(min(len(text), len(CALL_OPEN)), 0, -1):
        if CALL_OPEN.startswith(text[-k:]):
            return k
    return 0


class ToolCallParser:
    """Streaming parser: ``feed(text)`` / ``finish()`` return events, each a ``str`` (answer text) or a :class:`ToolCall`.

    Answer text is passed on as soon as it cannot be the start of ``<tool_call>``; a call is
    emitted when its block closes (``</tool_call>``, the next ``<tool_call>``, or ``finish()``).
    """

    def __init__(self, tools: Iterable[dict] | None = None) -> None:
        self.schemas = tool_schemas(tools)
        self._buf = ""
        self._in_call = False
        self.calls: list[ToolCall] = []
        self.text = ""  # all answer text passed on so far

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        return self._drain(final=True)

    def _emit_text(self, out: list[Event], text: str) -> None:
        if text:
            self.text += text
            if out and isinstance(out[-1], str):
                out[-1] += text
            else:
                out.append(text)

    def _close_block(self, out: list[Event], block: str, closed: bool) -> None:
        calls, extra = parse_block(block, self.schemas)
        if not calls:
            self._emit_text(out, CALL_OPEN + block + (CALL_CLOSE if closed else ""))
            return
        for c in calls:
            self.calls.append(c)
            out.append(c)
        self._emit_text(out, extra)

    def _drain(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            buf = self._buf
            if not self._in_call:
                m = _OPEN_RE.search(buf)
                if m:
                    self._emit_text(out, buf[: m.start()])
                    self._buf = buf[m.end():]
                    self._in_call = True
                    continue
                hold = 0 if final else _partial_open(buf)
                self._emit_text(out, buf[: len(buf) - hold])
                self._buf = buf[len(buf) - hold:]
                return out
            close = _CLOSE_RE.search(buf)
            reopen = _OPEN_RE.search(buf)
            if close and (not reopen or close.start() < reopen.start()):
                self._close_block(out, buf[: close.start()], closed=True)
                self._buf = buf[close.end():]
                self._in_call = False
                continue
            if reopen:  # a new call began before this one was closed
                self._close_block(out, buf[: reopen.start()], closed=False)
                self._buf = buf[reopen.start():]
                self._in_call = False
                continue
            if final:
                if buf.endswith("</tool_call"):
                    self._close_block(out, buf[: -len("</tool_call")], closed=True)
                else:
                    self._close_block(out, buf, closed=False)
                self._buf = ""
                self._in_call = False
            return out


def parse_tool_calls(text: str, tools: Iterable[dict] | None = None) -> tuple[str, list[ToolCall]]:
    """One-shot: ``(answer text without the calls, calls)``."""
    p = ToolCallParser(tools)
    p.feed(text)
    p.finish()
    return p.text, p.calls
