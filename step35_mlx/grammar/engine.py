"""Compile a :class:`~.spec.Constraint` for a tokenizer (llguidance) and mask logits with it.

:class:`GrammarProcessor` is a logits processor ``(tokens, logits) -> logits`` in the
protocol of ``decode.ar_tokens`` and ``speculative.speculative_tokens``: ``tokens`` is
the context of the row being sampled (the uncached prompt, then every token before that
row). It finds the answer in the context (the tokens after the first ``</think>``, or all
generated tokens when the reply does not start in reasoning), brings the matcher to it
(rolling back tokens that are no longer there, as after rejected MTP drafts) and sets every
token the grammar forbids to ``-inf``. Rows inside the reasoning pass unchanged.
"""

from __future__ import annotations

import json
import math
from typing import Any

import mlx.core as mx
import numpy as np

from ..reasoning import THINK_CLOSE
from .spec import Constraint

INSTALL_HINT = "constrained decoding (response_format, forced tool calls) needs llguidance: " \
               "pip install 'step35-mlx[grammar]'"
# Compact JSON the way json.dumps writes it; flexible whitespace lets a model pad forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: dict[int, tuple[Any, Any]] = {}  # id(hf tokenizer) -> (hf tokenizer, LLTokenizer)


def _llg():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return llguidance


def _hf(tokenizer: Any) -> Any:
    return getattr(tokenizer, "_tokenizer", tokenizer)


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: frozenset[int] | set[int]) -> Any:
    """llguidance's view of ``tokenizer`` (built once per tokenizer: it walks the whole vocabulary)."""
    llg = _llg()
    hf = _hf(tokenizer)
    key = id(hf)
    hit = _tokenizers.get(key)
    if hit is None or hit[0] is not hf:
        hit = (hf, llg.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None))
        _tokenizers[key] = hit
    return hit[1]


def _literal(text: str, added: dict[str, int]) -> str:
    """A grammar literal; a tag that is one added token of the tokenizer must be matched as that token."""
    if text in added:
        return f"<[{added[text]}]>"
    return json.dumps(text)


def _json_value(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _is_plain_string(schema: dict) -> bool:
    return schema.get("type") == "string" and not {"enum", "const"} & schema.keys()


def _param_value(schema: dict) -> str:
    """Right-hand side for a parameter value as the chat template renders it (strings raw, the rest JSON).

    A raw string's length limits are enforced; its ``pattern`` / ``format`` are not (the
    template has no quoting, so the JSON-string grammar does not apply).
    """
    if _is_plain_string(schema):
        # one lazy lexeme through the closing tag: the text ends at the first "\n</parameter>\n"
        n = schema.get("maxLength")
        count = f"{{{int(schema.get('minLength', 0))},{int(n)}}}" if isinstance(n, int) else "*"
        return f"[lazy]: /(.|\\n){count}\\n<\\/parameter>\\n/"
    choices = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if isinstance(choices, list) and choices and all(isinstance(v, str) for v in choices):
        values = " | ".join(json.dumps(v) for v in choices)  # string choices are written raw
    else:
        values = _json_value(schema)
    return f': ({values}) "\\n</parameter>\\n"'


def tool_call_grammar(tools: dict[str, dict], added: dict[str, int], many: bool) -> str:
    """Lark grammar of Step's XML tool calls of ``tools`` (``{name: parameters schema}``).

    Parameters come in the schema's ``properties`` order, required ones always, optional
    ones optionally; ``many``: one or more calls, else exactly one.
    """
    lines = ['start: "\\n"? ' + ('call ("\\n" call)*' if many else "call"),
             f'call: {_literal("<tool_call>", added)} "\\n" fn "</function>\\n" {_literal("</tool_call>", added)}',
             "fn: " + " | ".join(f"f{i}" for i in range(len(tools)))]
    for i, (name, schema) in enumerate(tools.items()):
        props = schema.get("properties") if isinstance(schema, dict) else None
        props = props if isinstance(props, dict) else {}
        required = set(schema.get("required") or []) if isinstance(schema, dict) else set()
        parts = []
        for j, (pname, pschema) in enumerate(props.items()):
            rule = f"f{i}p{j}"
            lines.append(f'{rule}: {json.dumps(f"<parameter={pname}>")} "\\n" {rule}v')
            lines.append(f"{rule}v{_param_value(pschema if isinstance(pschema, dict) else {})}")
            parts.append(rule if pname in required else rule + "?")
        lines.append(f'f{i}: {json.dumps(f"<function={name}>")} "\\n" ' + " ".join(parts))
    return "\n".join(lines) + "\n"


def json_grammar(schema: dict) -> str:
    """Lark grammar: an optional newline (the one the template puts after ``</think>``), then the JSON value."""
    return 'start: "\\n"? value\nvalue: ' + _json_value(schema) + "\n"


def grammar_text(constraint: Constraint, tokenizer: Any) -> str:
    """The llguidance (Lark) grammar of a constraint for this tokenizer."""
    if constraint.schema is not None:
        return json_grammar(constraint.schema)
    return tool_call_grammar(constraint.tools, _hf(tokenizer).get_added_vocab(), constraint.many_calls)


class GrammarProcessor:
    """Masks the logits of each answer row to the tokens ``matcher`` allows (see the module docstring).

    ``start``: tokens of the context before the first generated token (the uncached prompt);
    ``think_close``: the ``</think>`` token id when the reply starts inside the reasoning, else ``None``.
    """

    def __init__(self, matcher: Any, vocab_size: int, start: int, think_close: int | None):
        llg = _llg()
        self.matcher = matcher
        self.start = start
        self.think_close = think_close
        self.consumed: list[int] = []
        self.bitmask = llg.numpy.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self._fill = llg.numpy.fill_next_token_bitmask

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
        mx.async_eval(logits)  # the forward runs on the device while the host computes the mask
        answer = self.answer([int(t) for t in tokens[self.start:].tolist()])
        # A row after a token the grammar rejects (a draft that will be rejected) or after the
        # grammar's eos (nothing allowed) is never sampled from; it passes unchanged.
        if answer is None or not self.sync(answer):
            return logits
        allowed = self.allowed()
        return logits if allowed is None else mx.where(allowed, logits, -math.inf)


def grammar_processor(constraint: Constraint, tokenizer: Any, *, vocab_size: int, eos_ids: frozenset[int],
                      start: int, reasoning: bool) -> GrammarProcessor:
    """A processor enforcing ``constraint`` on a reply that starts ``start`` tokens into the context.

    ``reasoning``: the reply starts inside ``<think>`` (the mask starts after ``</think>``).
    ``ValueError`` when llguidance is missing, the grammar does not compile, or ``</think>``
    is not one token of the tokenizer while the reply starts in reasoning.
    """
    llg = _llg()
    think_close = None
    if reasoning:
        think_close = _hf(tokenizer).get_added_vocab().get(THINK_CLOSE)
        if think_close is None:
            raise ValueError(f"constrained decoding after reasoning needs {THINK_CLOSE} to be one token")
    grammar = llg.LLMatcher.grammar_from_lark(grammar_text(constraint, tokenizer))
    matcher = llg.LLMatcher(ll_tokenizer(tokenizer, vocab_size, eos_ids), grammar)
    if matcher.is_error():
        raise ValueError(f"the {constraint.kind} constraint does not compile: {matcher.get_error()}")
    return GrammarProcessor(matcher, vocab_size, start, think_close)
