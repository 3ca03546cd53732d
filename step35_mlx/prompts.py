"""Prompts in (chat messages, text or token ids), token ids out, checked before anything runs."""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx

from .reasoning import THINK_CLOSE, THINK_OPEN
from .text import check_text


def encode_prompt(tokenizer: Any, prompt: Any, tools: list | None = None) -> list[int]:
    """Token ids for a prompt: chat messages (rendered with the checkpoint's template and the
    generation prompt), raw text (``bos`` prepended unless present), or token ids.

    Text that is not valid Unicode (a lone surrogate, undecodable bytes) is a ``ValueError``.
    """
    if isinstance(prompt, mx.array):
        if prompt.ndim > 2 or (prompt.ndim == 2 and prompt.shape[0] != 1):
            raise ValueError(f"a token-id prompt must be 1-D (or one batch row [1, T]), got shape {tuple(prompt.shape)}")
        if not mx.issubdtype(prompt.dtype, mx.integer):
            raise ValueError(f"a token-id prompt must hold integers, got dtype {prompt.dtype}")
        return [int(t) for t in prompt.reshape(-1).tolist()]
    if isinstance(prompt, str):
        check_text(prompt)
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids
    prompt = list(prompt)
    if not prompt:
        raise ValueError("the prompt is empty")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if all(isinstance(m, dict) for m in prompt):
        _check_strings(prompt, "a message")
        _check_strings(tools or [], "a tool definition")
        return list(tokenizer.apply_chat_template(prompt, tools=tools or None, add_generation_prompt=True))
    raise TypeError("prompt must be a string, token ids, or a list of chat message dicts")


def _check_strings(value: Any, what: str) -> None:
    """``check_text`` on every string inside nested lists and dicts."""
    if isinstance(value, str):
        check_text(value, what)
    elif isinstance(value, dict):
        for v in value.values():
            _check_strings(v, what)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_strings(v, what)


def check_prompt_ids(ids: Sequence[int], vocab_size: int) -> None:
    """``ValueError`` naming the first id outside ``[0, vocab_size)`` (such ids would read outside the embedding)."""
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"token id {t} at position {i} is outside the vocabulary [0, {vocab_size})")


def opens_reasoning(tokenizer: Any, ids: Sequence[int]) -> bool:
    """Whether a prompt ends inside ``<think>`` (the Step template's generation prompt does)."""
    tail = tokenizer.decode(list(ids[-8:]), skip_special_tokens=False)
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE) and tail.rstrip().endswith(THINK_OPEN)
