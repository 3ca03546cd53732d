"""``tool_choice: "auto"``: free text as the model writes it, then only valid calls once it opens one.

The grammar switches on at the model's own ``<tool_call>`` token (one added token of Step's
tokenizer): the rows before it pass unchanged, so free text keeps its distribution exactly and
costs no mask. From the opener on, the matcher reads the answer from that token and masks
the rest of the turn to calls of the tools. The one thing refused in free text is spelling the
opener out of ordinary tokens (``<`` ``tool`` ``_call>``): the parser would read it as a call
the grammar never saw; :class:`OpenerGuard` masks only the tokens that would complete it.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from ..tool_calls import CALL_OPEN, opens_call
from .engine import GrammarProcessor

SPELLED = CALL_OPEN[:-1]  # "<tool_call": with ">" or a space after it the parser opens a call

_guards: dict[int, tuple[Any, "OpenerGuard"]] = {}  # id(LLTokenizer) -> (LLTokenizer, guard)


class OpenerGuard:
    """Masks the tokens that would make the text spell a call opener, given the text's last characters.

    ``texts[t]``: token ``t``'s text ("" for special tokens, which cannot spell anything). The
    mask for each state (how much of ``<tool_call`` the text ends with) is built on first use.
    """

    def __init__(self, texts: list[str], opener: int):
        self.texts = texts
        self.opener = opener
        self._masks: dict[int, mx.array | None] = {}

    @classmethod
    def for_tokenizer(cls, lltok: Any, opener: int) -> "OpenerGuard":
        """One guard per llguidance tokenizer (reading every token's text takes a moment on a 128K vocabulary)."""
        hit = _guards.get(id(lltok))
        if hit is None or hit[0] is not lltok or hit[1].opener != opener:
            texts = ["" if lltok.is_special_token(t) else lltok.decode_bytes([t]).decode("utf-8", "replace")
                     for t in range(lltok.vocab_size)]
            hit = (lltok, cls(texts, opener))
            _guards[id(lltok)] = hit
        return hit[1]

    @staticmethod
    def state(tail: str) -> int:
        """How many characters of ``<tool_call`` the text ends with (0 to 10)."""
        for k in range(len(SPELLED), 0, -1):
            if tail.endswith(SPELLED[:k]):
                return k
        return 0

    def forbidden(self, k: int) -> mx.array | None:
        """Boolean ``[V]`` of the tokens that complete an opener after text ending in ``SPELLED[:k]`` (None: none)."""
        if k not in self._masks:
            head, rest = SPELLED[:k], SPELLED[k:]
            bad = [t for t, s in enumerate(self.texts) if s and t != self.opener
                   and (s.startswith(rest) or SPELLED in s) and opens_call(head + s)]
            mask = np.zeros(len(self.texts), dtype=np.bool_)
            mask[bad] = True
            self._masks[k] = mx.array(mask) if bad else None
        return self._masks[k]


class AutoToolProcessor(GrammarProcessor):
    """A :class:`GrammarProcessor` whose grammar (one or more calls) starts at the first ``opener`` of the answer."""

    def __init__(self, matcher: Any, vocab_size: int, start: int, think_close: int | None, opener: int,
                 guard: OpenerGuard, lltok: Any):
        super().__init__(matcher, vocab_size, start, think_close)
        self.opener = opener
        self.guard = guard
        self.lltok = lltok

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # as in GrammarProcessor: the forward starts before the host reads the context
        answer = self.answer([int(t) for t in tokens[self.start:].tolist()])
        if answer is None:
            return logits
        if self.opener in answer:
            return self.mask(answer[answer.index(self.opener):], logits)
        tail = self.lltok.decode_bytes(answer[-len(SPELLED):]).decode("utf-8", "replace") if answer else ""
        forbid = self.guard.forbidden(self.guard.state(tail))
        return logits if forbid is None else mx.where(forbid, -math.inf, logits)
