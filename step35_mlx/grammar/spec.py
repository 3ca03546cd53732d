"""API options -> :class:`Constraint`: what the answer must be (a JSON value, or tool calls).

- ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
  (any JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
  (OpenAI's shape; the schema is enforced whether or not ``strict`` is set).
- ``tool_choice`` forcing a call: ``"required"`` (OpenAI) / ``{"type": "any"}`` (Anthropic)
  force one or more calls of any of ``tools``; ``{"type": "function", "function": {"name"}}``
  (OpenAI), ``{"type": "tool", "name"}`` (Anthropic) or a bare name force that tool.
  ``"none"`` forces nothing. ``"auto"`` / ``None`` with tools: the answer is free text, but a
  call the model starts (its ``<tool_call>`` token) must be a valid call of one of the tools
  (only when llguidance is installed; without it auto stays unconstrained).
- ``parallel_tool_calls=False`` (Anthropic: ``disable_parallel_tool_use`` in ``tool_choice``):
  at most one call, then the end of the turn.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from ..tool_calls import tool_schemas


@dataclass(frozen=True)
class Constraint:
    """What the answer after ``</think>`` must be: JSON matching ``schema``, or calls of ``tools`` (both: either).

    ``tools``: ``{name: parameters schema}`` of the tools a call may use (in order);
    ``many_calls``: one or more calls (``required`` / ``any``), else exactly one (a named tool,
    or ``parallel_tool_calls=False``); ``auto``: free text first, and the calls are optional
    (the grammar switches on at the model's own ``<tool_call>``).
    """

    schema: dict | None = None
    tools: dict[str, dict] = field(default_factory=dict)
    many_calls: bool = False
    auto: bool = False

    @property
    def kind(self) -> str:
        return "json" if self.schema is not None else "tool_call"

    def to_dict(self) -> dict:
        """JSON-safe form (what the server hands its worker, over the distributed job channel too)."""
        return {"schema": self.schema, "tools": self.tools, "many_calls": self.many_calls, "auto": self.auto}

    @classmethod
    def coerce(cls, value: "Constraint | dict | None") -> "Constraint | None":
        """A :class:`Constraint` from itself, its ``to_dict`` form, or ``None``."""
        if value is None or isinstance(value, Constraint):
            return value
        return cls(schema=value.get("schema"), tools=dict(value.get("tools") or {}),
                   many_calls=bool(value.get("many_calls")), auto=bool(value.get("auto")))


def _json_constraint(response_format: Any) -> Constraint | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return Constraint(schema={"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format json_schema needs a json_schema object with a schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema.schema must be a JSON schema object")
        return Constraint(schema=schema or {"type": "object"})
    raise ValueError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


def _forced_name(tool_choice: Any) -> str | None:
    """The tool a choice forces, ``""`` for "any tool", ``None`` for no forcing."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice in ("required", "any"):
        return ""
    if isinstance(tool_choice, str):
        return tool_choice
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if kind in ("auto", "none"):
            return None
        if kind == "any":
            return ""
        if kind == "tool":
            return str(tool_choice.get("name", ""))
        if kind == "function":
            fn = tool_choice.get("function") or {}
            return str(fn.get("name") or tool_choice.get("name") or "")
    raise ValueError(f"tool_choice {tool_choice!r} is not auto, none, required, any or a named tool")


def constraint_for(response_format: Any = None, tools: list[dict] | None = None,
                   tool_choice: Any = None, parallel_tool_calls: bool | None = None) -> Constraint | None:
    """The constraint the options ask for (``None``: unconstrained). ``ValueError`` on bad options.

    A forced tool call wins over ``response_format`` (the answer is then the call); with tools
    under auto, ``response_format`` makes the answer either its JSON value or calls.
    """
    parallel = parallel_tool_calls is not False and not _disables_parallel(tool_choice)
    name = _forced_name(tool_choice)
    if name is not None:
        schemas = {n: _parameters(t) for n, t in _tool_defs(tools).items()}
        if not schemas:
            raise ValueError("tool_choice forces a tool call but no tools were given")
        if name:
            if name not in schemas:
                raise ValueError(f"tool_choice names an unknown tool {name!r}")
            schemas = {name: schemas[name]}
        return Constraint(tools=schemas, many_calls=parallel and not name)
    json_constraint = _json_constraint(response_format)
    if not _is_auto(tool_choice) or importlib.util.find_spec("llguidance") is None:
        return json_constraint
    try:
        schemas = {n: _parameters(t) for n, t in _tool_defs(tools).items()}
    except ValueError:  # auto is best effort: tools the grammar cannot describe stay unconstrained
        return json_constraint
    if not schemas:
        return json_constraint
    if json_constraint is not None:  # the answer is the JSON value, or calls
        return Constraint(schema=json_constraint.schema, tools=schemas, many_calls=parallel)
    return Constraint(tools=schemas, many_calls=parallel, auto=True)


def _is_auto(tool_choice: Any) -> bool:
    return tool_choice in (None, "auto") or isinstance(tool_choice, dict) and tool_choice.get("type") == "auto"


def _disables_parallel(tool_choice: Any) -> bool:
    """Anthropic's ``tool_choice.disable_parallel_tool_use``."""
    return isinstance(tool_choice, dict) and tool_choice.get("disable_parallel_tool_use") is True


def _tool_defs(tools: list[dict] | None) -> dict[str, dict]:
    """``{name: function dict}`` (OpenAI ``{"type": "function", "function": {...}}``, Anthropic or bare)."""
    out: dict[str, dict] = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn
    return out


def _parameters(fn: dict) -> dict:
    """A tool's full parameters schema (``parameters`` for OpenAI, ``input_schema`` for Anthropic)."""
    params = fn.get("parameters", fn.get("input_schema"))
    if params is None:
        props = tool_schemas([fn]).get(fn["name"], {})
        params = {"type": "object", "properties": props}
    if not isinstance(params, dict):
        raise ValueError(f"tool {fn['name']!r} has parameters that are not a JSON schema object")
    return params
