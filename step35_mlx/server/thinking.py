"""The request fields that set the reasoning (rules in :mod:`step35_mlx.thinking`), as API errors."""

from __future__ import annotations

from typing import Any

from ..thinking import ThinkingRequest, anthropic_thinking, effort_budget
from .errors import APIError


def openai_reasoning_budget(effort: str | None) -> int | None:
    """The reasoning budget of OpenAI ``reasoning_effort`` (400 for an unknown level)."""
    try:
        return effort_budget(effort)
    except ValueError as e:
        raise APIError(400, str(e), param="reasoning_effort") from None


def anthropic_request_thinking(thinking: Any) -> ThinkingRequest:
    """Anthropic ``thinking``: whether to show ``thinking`` blocks and the budget (400 when malformed)."""
    try:
        return anthropic_thinking(thinking)
    except ValueError as e:
        raise APIError(400, str(e), param="thinking") from None
