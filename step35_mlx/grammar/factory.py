"""Build the logits processor of a :class:`~.spec.Constraint` for a tokenizer."""

from __future__ import annotations

import logging
from typing import Any

from ..reasoning import THINK_CLOSE
from ..tool_calls import CALL_OPEN
from .auto import AutoToolProcessor, OpenerGuard
from .engine import GrammarProcessor, grammar_text, hf_tokenizer, ll_tokenizer, llg
from .spec import Constraint

log = logging.getLogger(__name__)


def grammar_processor(constraint: Constraint, tokenizer: Any, *, vocab_size: int, eos_ids: frozenset[int],
                      start: int, reasoning: bool) -> GrammarProcessor | None:
    """A processor enforcing ``constraint`` on a reply that starts ``start`` tokens into the context.

    ``reasoning``: the reply starts inside ``<think>`` (the mask starts after ``</think>``).
    ``ValueError`` when llguidance is missing, the grammar does not compile, or ``</think>``
    is not one token of the tokenizer while the reply starts in reasoning. An auto constraint
    is best effort: where it cannot apply (``<tool_call>`` or ``</think>`` not one token, a tool
    schema the grammar cannot take) it is ``None`` and the reply is unconstrained (logged).
    """
    ll = llg()
    added = hf_tokenizer(tokenizer).get_added_vocab()
    think_close = added.get(THINK_CLOSE) if reasoning else None
    opener = added.get(CALL_OPEN)
    if constraint.auto and (opener is None or (reasoning and think_close is None)):
        log.warning("tool_choice auto stays unconstrained: %s is not one token of this tokenizer",
                    CALL_OPEN if opener is None else THINK_CLOSE)
        return None
    if reasoning and think_close is None:
        raise ValueError(f"constrained decoding after reasoning needs {THINK_CLOSE} to be one token")
    lltok = ll_tokenizer(tokenizer, vocab_size, eos_ids)
    try:
        matcher = ll.LLMatcher(lltok, ll.LLMatcher.grammar_from_lark(grammar_text(constraint, tokenizer)))
        error = matcher.get_error() if matcher.is_error() else None
    except (ValueError, TypeError) as e:  # a pattern regex_to_lark cannot take
        error = str(e)
    if error is not None:
        if constraint.auto:
            log.warning("tool_choice auto stays unconstrained: the tools' grammar does not compile: %s", error)
            return None
        if constraint.schema is not None and constraint.tools:  # auto tools beside response_format: best effort
            log.warning("tool calls beside response_format are not constrained (their grammar does not compile): "
                        "%s", error)
            return grammar_processor(Constraint(schema=constraint.schema), tokenizer, vocab_size=vocab_size,
                                     eos_ids=eos_ids, start=start, reasoning=reasoning)
        raise ValueError(f"the {constraint.kind} constraint does not compile: {error}")
    if constraint.auto:
        return AutoToolProcessor(matcher, vocab_size, start, think_close, opener,
                                 OpenerGuard.for_tokenizer(lltok, opener), lltok)
    return GrammarProcessor(matcher, vocab_size, start, think_close, eos_ids)
