"""``stream_generate(..., prefix_cache=)``: restore the longest cached prefix, generate, store prompt and reply ends."""

from __future__ import annotations

from typing import Any, Iterator

from ..chunks import run
from ..prompts import check_prompt_ids
from ..results import GenerationChunk
from ..settings import Settings
from .store import PrefixCache


def cached_stream(model: Any, tokenizer: Any, cache: list, ids: list[int], settings: Settings,
                  prefix_cache: PrefixCache, tools: list | None,
                  keys: list[int] | None = None) -> Iterator[GenerationChunk]:
    """Like ``run(..., cached=0)`` on an empty ``cache``, with the prompt's cached prefix restored first.

    ``keys``: what the prefix cache compares instead of ``ids`` (image tokens carry their image's
    pixel hash there, see ``vision.inputs``); default ``ids``.
    """
    check_prompt_ids(ids, model.config.vocab_size)
    keys = list(ids) if keys is None else keys
    settings.budget(len(ids))  # ValueError before the cache is touched
    hit = prefix_cache.restore(keys, cache)
    chunks = run(model, tokenizer, cache, ids, hit.length, settings, tools=tools,
                 on_prefilled=lambda: prefix_cache.capture(cache, keys))
    return _store_reply(chunks, prefix_cache, cache, keys, hit.tier)


def _store_reply(chunks: Iterator[GenerationChunk], pc: PrefixCache, cache: list, ids: list[int],
                 tier: str) -> Iterator[GenerationChunk]:
    generated: list[int] = []
    try:
        for chunk in chunks:
            generated += chunk.token_ids
            chunk.stats.cached_from = tier
            yield chunk
    finally:
        chunks.close()
        tokens = ids + generated
        target = min([len(tokens)] + [c.offset for c in cache])
        if all(c.offset - target <= c.max_trim() for c in cache):
            for c in cache:
                c.trim(c.offset - target)
            pc.capture(cache, tokens[:target])
        pc.flush()
