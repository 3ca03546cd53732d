"""``response_format``, ``tool_choice`` and ``parallel_tool_calls`` of a request -> the worker's constraint."""

from __future__ import annotations

import importlib.util
from typing import Any

from ..grammar import constraint_for
from ..grammar.engine import INSTALL_HINT
from .errors import APIError


def request_constraint(response_format: dict | None, tools: list[dict] | None, tool_choice: Any,
                       parallel_tool_calls: bool | None = None) -> dict | None:
    """The request's :class:`~step35_mlx.grammar.Constraint` in its JSON form (``None``: unconstrained).

    Bad options are a 400 naming the field. The grammar engine is checked here too, so a
    server without llguidance refuses the request instead of failing in the worker (tools
    under ``tool_choice`` auto are then simply unconstrained).
    """
    try:
        constraint = constraint_for(response_format, tools, tool_choice, parallel_tool_calls)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice" if tool_choice not in (None, "auto", "none") else
                       "response_format") from None
    if constraint is None:
        return None
    if importlib.util.find_spec("llguidance") is None:
        raise APIError(400, INSTALL_HINT, param="response_format" if constraint.schema is not None else "tool_choice")
    return constraint.to_dict()
