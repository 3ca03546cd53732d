"""Make the real model open its answer with a fixed text, then continue on its own (tool_choice auto tests).

The demo model was never trained on tool calls and does not open one by itself. ``force_prefix``
wraps the real token generator (plain or MTP) with a logits processor that allows only the
next token of the script while the reply is still inside it; every other row, and every other
processor (the grammar among them), runs unchanged. So a reply scripted to ``...</think>\\n<tool_call>``
continues through the real sampler, grammar mask and tool-call parser.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from step35_mlx import chunks, decode


class Prefix:
    """Logits processor: row ``n`` of the reply (read from the context: MTP drafts too) may only be ``script[n]``."""

    def __init__(self, script: list[int], start: int):
        self.script = script
        self.start = start

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        reply = tokens[self.start:].tolist()
        n = len(reply)
        if n < len(self.script) and reply == self.script[:n]:
            return mx.where(mx.arange(logits.shape[-1]) == self.script[n], logits, -math.inf)
        return logits


def force_prefix(monkeypatch: Any, tokenizer: Any, text: str) -> list[int]:
    """Every generation (until the monkeypatch is undone) starts with ``text``; returns its token ids."""
    script = tokenizer.encode(text, add_special_tokens=False)
    real = decode.token_generator

    def chooser(*args: Any, **kwargs: Any) -> Any:
        inner = real(*args, **kwargs)

        def gen(model, cache, prompt, params, *, logits_processors, **kw):
            procs = [Prefix(script, prompt.size)] + list(logits_processors)
            return inner(model, cache, prompt, params, logits_processors=procs, **kw)

        return gen

    monkeypatch.setattr(chunks, "token_generator", chooser)  # `run` looks it up in chunks
    return script
