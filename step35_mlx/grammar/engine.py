"""Compile a :class:`~.spec.Constraint` for a tokenizer (llguidance) and mask logits with it.

:class:`GrammarProcessor` is a logits processor ``(tokens, logits) -> logits`` in the
protocol of ``decode.ar_tokens`` and ``speculative.speculative_tokens``: ``tokens`` is
the context of the row being sampled (the uncached prompt, then every token before that
row). It finds the answer in the context (the tokens after the first ``</think>``, or all
generated tokens when the reply does not start in reasoning), brings the matcher to it
(rolling back tokens that are no longer there, as after rejected MTP drafts) and sets every
token the grammar forbids to ``-inf``. Rows inside the reasoning pass unchanged, except that a
constraint that must produce something (a forced call, a JSON value) cannot let the reply end there:
the end-of-sequence tokens' probability moves to ``</think>``, so "stop now" becomes "answer now".
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from .calls import json_value, tool_call_grammar
from .spec import Constraint

INSTALL_HINT = "constrained decoding (response_format, forced tool calls) needs llguidance: " \
               "pip install 'step35-mlx[grammar]'"

_tokenizers: dict[int, tuple[Any, Any]] = {}  # id(hf tokenizer) -> (hf tokenizer, LLTokenizer)


def llg():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return llguidance


def hf_tokenizer(tokenizer: Any) -> Any:
    return getattr(tokenizer, "_tokenizer", tokenizer)


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: frozenset[int] | set[int]) -> Any:
    """llguidance's view of ``tokenizer`` (built once per tokenizer: it walks the whole vocabulary)."""
    ll = llg()
    hf = hf_tokenizer(tokenizer)
    key = id(hf)
    hit = _tokenizers.get(key)
    if hit is None or hit[0] is not hf:
        hit = (hf, ll.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None))
        _tokenizers[key] = hit
    return hit[1]


def json_grammar(schema: dict, calls: str | None = None) -> str:
    """Lark grammar: an optional newline (the one the template puts after ``</think>``), then the JSON value;
    with ``calls`` (a grammar whose root rule is ``calls``), the value or those calls."""
    if calls is None:
        return 'start: "\\n"? value\nvalue: ' + json_value(schema) + "\n"
    return 'start: "\\n"? (value | calls)\nvalue: ' + json_value(schema) + "\n" + calls


def grammar_text(constraint: Constraint, tokenizer: Any) -> str:
    """The llguidance (Lark) grammar of a constraint for this tokenizer (auto: the calls from the first opener on)."""
    added = hf_tokenizer(tokenizer).get_added_vocab()
    if constraint.schema is not None:
        calls = tool_call_grammar(constraint.tools, added, constraint.many_calls, lead=False, rule="calls") \
            if constraint.tools else None
        return json_grammar(constraint.schema, calls)
    return tool_call_grammar(constraint.tools, added, constraint.many_calls, lead=not constraint.auto)


class GrammarProcessor:
    """Masks the logits of each answer row to the tokens ``matcher`` allows (see the module docstring).

    ``start``: tokens of the context before the first generated token (the uncached prompt);
    ``think_close``: the ``</think>`` token id when the reply starts inside the reasoning, else ``None``;
    ``eos_ids``: end-of-sequence ids turned into ``</think>`` inside the reasoning (empty: the reply may
    end in its reasoning, as under ``tool_choice`` auto).
    """

    def __init__(self, matcher: Any, vocab_size: int, start: int, think_close: int | None,
                 eos_ids: frozenset[int] | set[int] = frozenset()):
        ll = llg()
        self.matcher = matcher
        self.start = start
        self.think_close = think_close
        ends = [i for i in sorted(eos_ids) if i < vocab_size and i != think_close]
        self.end_mask = self.close_mask = None
        if ends and think_close is not None:
            ids = mx.arange(vocab_size)
            self.end_mask = (ids[None, :] == mx.array(ends)[:, None]).any(axis=0)
            self.close_mask = ids == think_close
        self.consumed: list[int] = []
        self.bitmask = ll.numpy.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self._fill = ll.numpy.fill_next_token_bitmask

    def answer(self, generated: list[int]) -> list[int] | None:
        """The answer part of the generated tokens, ``None`` while the reasoning is open."""
        if self.think_close is None:
            return generated
        try:
            return generated[generated.index(self.think_close) + 1:]
        except ValueError:
            return None

    def sync(self, answer: list[int]) -> bool:
        """Bring the matcher to ``answer`` (rollback, then consume); ``False`` if a token breaks the grammar."""
        k = 0
        for a, b in zip(self.consumed, answer):
            if a != b:
                break
            k += 1
        if k < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - k)
            del self.consumed[k:]
        new = answer[k:]
        ok = self.matcher.validate_tokens(new) if new else 0
        if ok:
            self.matcher.consume_tokens(new[:ok])
            self.consumed += new[:ok]
        return ok == len(new)

    def allowed(self) -> mx.array | None:
        """Boolean ``[V]``: the tokens the grammar allows next (``None``: none, the grammar has ended)."""
        self._fill(self.matcher, self.bitmask, 0)
        if not self.bitmask.any():
            return None
        bits = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[: self.vocab_size]
        return mx.array(bits.astype(np.bool_))

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # the forward runs on the device while the host reads the context and masks
        answer = self.answer([int(t) for t in tokens[self.start:].tolist()])
        if answer is None:
            return logits if self.end_mask is None else self.close_instead_of_end(logits)
        return self.mask(answer, logits)

    def close_instead_of_end(self, logits: mx.array) -> mx.array:
        """A reasoning row: ``</think>`` takes the end tokens' probability (log-sum-exp), which become ``-inf``."""
        end = mx.logsumexp(mx.where(self.end_mask, logits, -math.inf), axis=-1, keepdims=True)
        return mx.where(self.close_mask, mx.logaddexp(logits, end), mx.where(self.end_mask, -math.inf, logits))

    def mask(self, segment: list[int], logits: mx.array) -> mx.array:
        """``logits`` with every token the grammar forbids after ``segment`` (the tokens it has read) at ``-inf``."""
        # A row after a token the grammar rejects (a draft that will be rejected) or after the
        # grammar's eos (nothing allowed) is never sampled from; it passes unchanged.
        if not self.sync(segment):
            return logits
        allowed = self.allowed()
        return logits if allowed is None else mx.where(allowed, logits, -math.inf)
