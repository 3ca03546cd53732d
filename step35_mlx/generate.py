"""The public generation API: ``stream_generate`` / ``generate``, prompt in, chunks or text out.

Layers, from the bottom (each in its own module; the names stay importable from here):

- :mod:`step35_mlx.decode`: token generators (plain ``ar_tokens``; ``token_generator`` picks
  MTP speculative decoding when asked), ``prefill``, ``last_logits``, ``new_cache``.
- :mod:`step35_mlx.chunks`: ``run`` turns a token stream into :class:`GenerationChunk` s
  (detokenizing, eos, stop strings (:mod:`step35_mlx.stops`), ``max_tokens``, reasoning /
  answer split, tool calls, statistics). ``ChatSession`` calls it with a cache that already
  holds the conversation.
- :mod:`step35_mlx.settings`: ``resolve_settings`` (call > ``generation_config.json`` > fallbacks);
  :mod:`step35_mlx.prompts`: ``encode_prompt`` and the prompt checks;
  :mod:`step35_mlx.results`: ``GenerationChunk`` / ``GenerationStats``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from .chunks import run
from .decode import TokenGenerator, ar_tokens, last_logits, new_cache, prefill, token_generator
from .grammar import constraint_for
from .prefix_cache.stream import cached_stream
from .prompts import check_prompt_ids, encode_prompt, opens_reasoning
from .results import GenerationChunk, GenerationStats
from .settings import (
    DEFAULT_DRAFT_DEPTH,
    FALLBACK_SETTINGS,
    REPETITION_CONTEXT,
    Settings,
    model_generation_config,
    read_generation_config,
    resolve_mtp,
    resolve_settings,
)

__all__ = [
    "DEFAULT_DRAFT_DEPTH", "FALLBACK_SETTINGS", "REPETITION_CONTEXT", "GenerationChunk", "GenerationStats",
    "Settings", "TokenGenerator", "ar_tokens", "check_prompt_ids", "encode_prompt", "generate", "last_logits",
    "model_generation_config", "new_cache", "opens_reasoning", "prefill", "read_generation_config",
    "resolve_mtp", "resolve_settings", "run", "stream_generate", "token_generator",
]


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt_or_messages: str | Sequence[int] | Sequence[dict] | mx.array,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    prefill_step: int = 512,
    tools: list[dict] | None = None,
    mtp: bool | None = None,
    draft_depth: int | None = None,
    max_context: int | None = None,
    generation_config: dict | None = None,
    kv_bits: int | None = None,
    kv_group_size: int | None = None,
    prefix_cache: Any = None,
    reasoning_budget: int | None = None,
    clamp_max_tokens: bool = False,
    response_format: dict | None = None,
    tool_choice: str | dict | None = None,
    parallel_tool_calls: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[GenerationChunk]:
    """Generate a reply, one :class:`GenerationChunk` per token.

    ``prompt_or_messages``: a list of chat messages (rendered with the checkpoint's
    chat template, ``tools`` included, generation prompt appended), raw text (tokenized
    as is, ``bos`` prepended), or token ids. Unset sampling values come from the
    checkpoint's ``generation_config.json`` (or ``generation_config=``), else
    :data:`FALLBACK_SETTINGS`; ``temperature=0`` is greedy. Generation stops at any
    eos id (config.json, tokenizer, generation_config.json), at a ``stop`` string (not
    included in the text; searched only in the answer, after ``</think>``), or after ``max_tokens``. ``max_tokens`` unset means
    "up to 8192 (or max_new_tokens), clamped to what fits in the context"; a prompt
    that, with an explicit ``max_tokens``, exceeds the context (``max_context`` or
    the model's ``max_position_embeddings``) raises ``ValueError`` before anything runs
    (``clamp_max_tokens=True``: generation stops at the context instead, finish ``"length"``).
    ``reasoning_budget``: close the reasoning (force ``</think>``) after that many tokens.
    ``mtp``/``draft_depth`` select speculative decoding (issue 6); ``kv_bits`` (4 or 8)
    stores the KV cache quantized. ``prefix_cache`` (a :class:`~step35_mlx.prefix_cache.PrefixCache`)
    restores the longest cached prefix of the prompt and stores the prompt's and the reply's state.
    Message content parts ``{"type": "image", "image": SOURCE}`` (a path, bytes or ``PIL.Image``)
    feed a Step 3.7 model's vision tower.
    ``response_format`` (``json_object`` / ``json_schema``) and a forcing ``tool_choice``
    (``"required"``, ``"any"``, a named tool) constrain the answer after ``</think>`` by a grammar
    (:mod:`step35_mlx.grammar`, needs the extra ``grammar``); with ``tools`` and ``tool_choice`` auto
    (the default) a call the model opens must be valid; ``parallel_tool_calls=False``: at most one call.
    ``should_stop``: asked before each prefill chunk (``prefill_step`` tokens); True ends the
    stream without a chunk (a server whose client went away); between tokens, stop iterating.
    """
    settings = resolve_settings(
        model, tokenizer, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
        prefill_step=prefill_step, max_context=max_context, mtp=mtp, draft_depth=draft_depth,
        generation_config=generation_config, reasoning_budget=reasoning_budget, clamp_max_tokens=clamp_max_tokens,
        constraint=constraint_for(response_format, tools, tool_choice, parallel_tool_calls),
        should_stop=should_stop,
    )
    ids = encode_prompt(tokenizer, prompt_or_messages, tools)
    cache = new_cache(model, kv_bits, kv_group_size)
    from .vision.inputs import prepare

    prepared = prepare(model, tokenizer, prompt_or_messages, ids)
    if prefix_cache is not None:
        return cached_stream(prepared.model, tokenizer, cache, prepared.ids, settings, prefix_cache, tools,
                             keys=prepared.keys)
    return run(prepared.model, tokenizer, cache, prepared.ids, 0, settings, tools=tools)


def generate(model: Any, tokenizer: Any, prompt_or_messages: Any, **kwargs: Any) -> str:
    """The whole generated text (raw: for chat prompts it holds the reasoning, ``</think>`` and the answer).

    Takes the arguments of :func:`stream_generate`. Use
    ``step35_mlx.reasoning.split_reasoning`` to separate reasoning and answer.
    """
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt_or_messages, **kwargs))
