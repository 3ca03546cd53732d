"""Reasoning-aware generation rules shared by the server's APIs (chat, messages, responses).

* Stop strings apply only to the answer: :class:`AnswerStart` finds where the answer
  begins in the raw text (after ``</think>`` and its newline), and stops are searched
  from there only. A reply that does not start inside ``<think>`` is all answer.
* A reasoning budget closes the reasoning after ``budget`` tokens:
  :func:`budget_processor` forces ``\\n</think>\\n`` once that many tokens were generated
  without the model closing ``</think>`` itself, and the model continues with the answer.
* Request fields map onto the budget: Anthropic ``thinking.budget_tokens``
  (:func:`anthropic_thinking`), OpenAI ``reasoning_effort`` (:data:`EFFORT_BUDGETS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import mlx.core as mx

from .reasoning import THINK_CLOSE

# OpenAI ``reasoning_effort`` -> reasoning budget in tokens (None: the model reasons as long as it likes).
EFFORT_BUDGETS: dict[str, int | None] = {"none": 0, "minimal": 0, "low": 1024, "medium": 4096, "high": None,
                                         "xhigh": None}


def effort_budget(effort: str | None) -> int | None:
    """The reasoning budget of an OpenAI ``reasoning_effort`` (``ValueError`` for an unknown level)."""
    if effort is None:
        return None
    if effort not in EFFORT_BUDGETS:
        raise ValueError(f"reasoning_effort {effort!r} is not one of {', '.join(EFFORT_BUDGETS)}")
    return EFFORT_BUDGETS[effort]


@dataclass(frozen=True)
class ThinkingRequest:
    """What a request asks of the reasoning: show it to the client, and at most how many tokens of it."""

    show: bool
    budget: int | None


def anthropic_thinking(thinking: Any) -> ThinkingRequest:
    """Anthropic's ``thinking`` field: ``enabled`` (with ``budget_tokens``) or ``adaptive`` show the
    reasoning as ``thinking`` blocks; absent or ``disabled`` hide it (the model still reasons)."""
    if thinking is None:
        return ThinkingRequest(show=False, budget=None)
    if not isinstance(thinking, dict):
        raise ValueError("thinking: must be an object such as {\"type\": \"enabled\", \"budget_tokens\": 1024}")
    kind = thinking.get("type")
    if kind == "disabled":
        return ThinkingRequest(show=False, budget=None)
    if kind == "adaptive":
        return ThinkingRequest(show=True, budget=None)
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"thinking.budget_tokens must be a non-negative integer, got {budget!r}")
        return ThinkingRequest(show=True, budget=budget)
    raise ValueError(f"thinking.type {kind!r} is not one of enabled, adaptive, disabled")


class AnswerStart:
    """Where the answer begins in a reply's raw text, found as the text grows.

    ``position(text)`` is ``None`` while the reply is still reasoning (or the newline
    after ``</think>`` has not arrived yet), then the index of the answer's first character.
    """

    def __init__(self, in_reasoning: bool) -> None:
        self._at: int | None = None if in_reasoning else 0
        self._searched = 0

    def position(self, text: str) -> int | None:
        if self._at is not None:
            return self._at
        i = text.find(THINK_CLOSE, max(0, self._searched - len(THINK_CLOSE)))
        if i < 0:
            self._searched = len(text)
            return None
        end = i + len(THINK_CLOSE)
        if len(text) == end:
            return None  # the template's newline after the tag may still come
        self._at = end + 1 if text[end] == "\n" else end
        return self._at


def close_tokens(tokenizer: Any) -> list[int]:
    """Token ids of ``\\n</think>\\n``, what the budget forces."""
    return list(tokenizer.encode("\n" + THINK_CLOSE + "\n", add_special_tokens=False))


def budget_processor(tokenizer: Any, budget: int, prompt_len: int) -> Callable[[mx.array, mx.array], mx.array]:
    """A logits processor that closes the reasoning after ``budget`` generated tokens.

    ``prompt_len``: how many tokens of the history the decoding loop starts with (the
    uncached prompt), so ``history[prompt_len:]`` is the generated text. Stateless: it
    looks only at the history it is given, so it works for MTP drafts and verify rows too.
    """
    forced = close_tokens(tokenizer)
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE) if hasattr(tokenizer, "convert_tokens_to_ids") else None
    if not isinstance(close_id, int) or len(tokenizer.encode(THINK_CLOSE, add_special_tokens=False)) != 1:
        close_id = None

    def process(history: mx.array, logits: mx.array) -> mx.array:
        n = history.size - prompt_len
        if n < budget or n >= budget + len(forced):
            return logits
        gen: Sequence[int] = history[prompt_len:].tolist()
        head = gen[:budget]
        if (close_id is not None and close_id in head) or (close_id is None and _closes(tokenizer, head)):
            return logits  # the model closed the reasoning itself
        tail = gen[budget:]
        if tail != forced[:len(tail)]:
            return logits
        want = forced[len(tail)]
        hit = mx.arange(logits.shape[-1]) == want
        return mx.where(hit, mx.zeros_like(logits), mx.full(logits.shape, -math.inf, logits.dtype))

    return process


def _closes(tokenizer: Any, ids: Sequence[int]) -> bool:
    return THINK_CLOSE in tokenizer.decode(list(ids), skip_special_tokens=False)
