"""OpenAI ``logprobs`` objects (legacy completions and chat) from :class:`~step35_mlx.logprobs.TokenLogprobs`."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..logprobs import TokenLogprobs
from .errors import APIError


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request: a string, token ids, or a list of either (400 when empty)."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt or [])
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt: must not be empty", param="prompt")
    for p in prompts:
        if not isinstance(p, str) and not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise APIError(400, "prompt: each prompt is a string or a list of token ids", param="prompt")
    return prompts


def implicit_bos(tokenizer: Any, prompt: str | list[int], ids: Sequence[int]) -> int:
    """1 when the server put a ``bos`` the prompt text does not hold in front of its tokens, else 0.

    That token is context, not prompt: ``echo`` starts after it, so the echoed tokens and
    ``text_offset`` match the echoed text and the first text token has a real log-probability
    (lm-eval's ``tokenized_requests=False`` counts context tokens with the tokenizer's own, bos-free ids).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(prompt, str) or bos is None or not ids or ids[0] != bos:
        return 0
    return 0 if prompt.startswith(tokenizer.decode([bos], skip_special_tokens=False)) else 1


def _decoder(tokenizer: Any) -> Callable[[int], str]:
    """``decode([id])`` memoised: a long prompt's logprobs decode the same ids many times over."""
    seen: dict[int, str] = {}

    def text(t: int) -> str:
        s = seen.get(t)
        if s is None:
            s = seen[t] = tokenizer.decode([t], skip_special_tokens=False)
        return s

    return text


def completion_logprobs(tokenizer: Any, scored: TokenLogprobs, first: int, offset: int) -> dict:
    """The legacy ``logprobs`` of positions ``first..``: tokens, token_logprobs, top_logprobs, text_offset.

    ``text_offset`` counts characters of the tokens' decoded strings from ``offset``.
    """
    text = _decoder(tokenizer)
    tokens, offsets = [], []
    at = offset
    for t in scored.ids[first:]:
        s = text(t)
        tokens.append(s)
        offsets.append(at)
        at += len(s)
    tops = [None if lp is None else {text(i): v for i, v in top}
            for lp, top in zip(scored.logprobs[first:], scored.top[first:])]
    return {"tokens": tokens, "token_logprobs": scored.logprobs[first:], "top_logprobs": tops,
            "text_offset": offsets}


def _entry(tokenizer: Any, token: int, logprob: float) -> dict:
    s = tokenizer.decode([token], skip_special_tokens=False)
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def chat_logprobs(tokenizer: Any, scored: TokenLogprobs, first: int) -> dict:
    """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}``."""
    content = []
    for i in range(first, len(scored.ids)):
        e = _entry(tokenizer, scored.ids[i], scored.logprobs[i])
        e["top_logprobs"] = [_entry(tokenizer, t, v) for t, v in scored.top[i]]
        content.append(e)
    return {"content": content, "refusal": None}


def reply_ids(tokenizer: Any, token_ids: Sequence[int], text: str, eos_ids: frozenset[int],
              stopped: bool) -> list[int]:
    """The generated tokens that the reply's text holds: no trailing eos and, when a stop string
    ended it (``stopped``), none whose text lies past the cut."""
    ids = list(token_ids)
    if ids and ids[-1] in eos_ids:
        ids.pop()
    while stopped and ids and len(tokenizer.decode(ids, skip_special_tokens=False)) > len(text):
        ids.pop()
    return ids
