"""Stop strings: how much of a growing reply may be shown, searched in the answer only (after ``</think>``).

Text that could still become a stop string is held back until the next token decides it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reasoning import partial_suffix
from .thinking import AnswerStart


@dataclass
class StopCut:
    """Where the text shown so far may end: ``end``; ``stopped`` when a stop string begins there."""

    end: int
    stopped: bool


class StopStrings:
    """Finds ``stops`` in a reply's raw text as it grows (``in_reasoning``: the reply starts inside ``<think>``)."""

    def __init__(self, stops: list[str], in_reasoning: bool) -> None:
        self.stops = stops
        self._answer = AnswerStart(in_reasoning=in_reasoning)
        self._longest = max((len(s) for s in stops), default=0)

    def cut(self, text: str, emitted: int, final: bool) -> StopCut:
        """The cut for ``text`` of which ``emitted`` characters were shown; ``final``: no more text comes."""
        if not self.stops:
            return StopCut(len(text), False)
        answer_at = self._answer.position(text)
        if answer_at is None:
            return StopCut(len(text), False)
        start = max(answer_at, emitted - self._longest + 1)
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        if hits:
            return StopCut(min(hits), True)
        if final:
            return StopCut(len(text), False)
        return StopCut(max(emitted, len(text) - partial_suffix(text[answer_at:], self.stops)), False)
