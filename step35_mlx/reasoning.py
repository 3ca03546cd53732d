"""Split Step 3.5 output into reasoning and answer, while it streams.

The chat template's generation prompt ends with ``<think>\\n``, so a reply starts
*inside* the reasoning: everything before ``</think>`` is reasoning, everything after
is the answer. One ``\\n`` right before and one right after ``</think>`` belong to the
tag and are dropped (the template renders ``reasoning + '\\n</think>\\n' + answer``).
An explicit leading ``<think>`` (plus one ``\\n`` after it) is accepted and dropped too.

The splitter gives the same result however the text is cut into chunks: a tag split
across chunks, or the newline arriving in the next chunk, is held back until it is
decided.
"""

from __future__ import annotations

from typing import Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Suffixes that may still turn into "\n</think>" (held back in the reasoning state).
_CLOSE_PATTERNS = ("\n" + THINK_CLOSE, THINK_CLOSE)


def partial_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``patterns``."""
    best = 0
    for p in patterns:
        for k in range(min(len(text), len(p) - 1), best, -1):
            if text.endswith(p[:k]):
                best = k
                break
    return best


class ReasoningSplitter:
    """Streaming ``<think>`` splitter: ``feed(text) -> (reasoning, answer)`` deltas, ``finish()`` at the end.

    ``in_reasoning=True`` (the default, for prompts that end inside ``<think>``) treats
    text before ``</think>`` as reasoning; with ``False`` the text is answer unless it
    starts with ``<think>``. A reply that never closes ``</think>`` is all reasoning.
    """

    def __init__(self, in_reasoning: bool = True) -> None:
        self.in_reasoning_at_start = in_reasoning
        self._state = "start"
        self._buf = ""
        self.reasoning = ""
        self.answer = ""

    @property
    def reasoning_done(self) -> bool:
        """True once ``</think>`` has been seen (or the reply turned out to have no reasoning)."""
        return self._state in ("after_close", "answer")

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        r_out: list[str] = []
        a_out: list[str] = []
        while True:
            buf = self._buf
            st = self._state
            if st == "start":
                stripped = buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    # whitespace before an explicit <think> is formatting: dropped
                    self._buf = stripped[len(THINK_OPEN):]
                    self._state = "after_open"
                    continue
                if not final and THINK_OPEN.startswith(stripped):
                    break  # still undecided ("", whitespace, "<th", ...)
                self._state = "reasoning" if self.in_reasoning_at_start else "answer"
                continue
            if st in ("after_open", "after_close"):
                if not buf and not final:
                    break
                if buf.startswith("\n"):
                    self._buf = buf[1:]
                self._state = "reasoning" if st == "after_open" else "answer"
                continue
            if st == "reasoning":
                i = buf.find(THINK_CLOSE)
                if i >= 0:
                    part = buf[:i]
                    if part.endswith("\n"):
                        part = part[:-1]
                    r_out.append(part)
                    self._buf = buf[i + len(THINK_CLOSE):]
                    self._state = "after_close"
                    continue
                hold = 0 if final else partial_suffix(buf, _CLOSE_PATTERNS)
                r_out.append(buf[: len(buf) - hold])
                self._buf = buf[len(buf) - hold:]
                break
            # answer
            a_out.append(buf)
            self._buf = ""
            break
        r, a = "".join(r_out), "".join(a_out)
        self.reasoning += r
        self.answer += a
        return r, a


def split_reasoning(text: str, in_reasoning: bool = True) -> tuple[str, str]:
    """One-shot ``(reasoning, answer)`` of a whole reply (same rules as the streaming splitter)."""
    s = ReasoningSplitter(in_reasoning)
    s.feed(text)
    s.finish()
    return s.reasoning, s.answer
