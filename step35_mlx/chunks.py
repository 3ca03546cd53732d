"""Token ids to :class:`~step35_mlx.results.GenerationChunk` s: the loop under ``stream_generate`` and ``ChatSession``.

:func:`run` drives a token generator (:mod:`step35_mlx.decode`) and does the rest:
detokenizing (mlx-lm's streaming detokenizer), eos and stop strings, ``max_tokens``, the
reasoning / answer split, tool-call parsing and statistics.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from .decode import token_generator
from .grammar import grammar_processor
from .prompts import check_prompt_ids, opens_reasoning
from .reasoning import ReasoningSplitter
from .results import GenerationChunk, GenerationStats
from .settings import REPETITION_CONTEXT, Settings
from .stops import StopStrings
from .thinking import budget_processor
from .tool_calls import ToolCall, ToolCallParser


def _peak_gb() -> float:
    try:
        return mx.get_peak_memory() / 1e9
    except AttributeError:  # older MLX
        return mx.metal.get_peak_memory() / 1e9


def run(
    model: Any,
    tokenizer: Any,
    cache: list,
    prompt_ids: Sequence[int],
    cached: int,
    settings: Settings,
    *,
    reasoning: bool | None = None,
    tools: list | None = None,
    on_prefilled: Callable[[], None] | None = None,
) -> Iterator[GenerationChunk]:
    """Generate after ``prompt_ids``, of which the first ``cached`` are already in ``cache``.

    ``reasoning``: whether the reply starts inside ``<think>`` (``None``: look at the
    prompt). ``tools``: parse tool calls out of the answer. Checks the context budget
    and compiles ``settings.constraint`` (the answer's grammar) before anything runs.
    ``settings.should_stop`` reaches the prefill: when it stops it, no chunk is yielded.
    """
    prompt_ids = list(prompt_ids)
    check_prompt_ids(prompt_ids, model.config.vocab_size)
    if not 0 <= cached < len(prompt_ids):
        raise ValueError(f"cached ({cached}) must be < the prompt length ({len(prompt_ids)})")
    budget = settings.budget(len(prompt_ids))
    gen = token_generator(settings.mtp, settings.draft_depth)
    if reasoning is None:
        reasoning = opens_reasoning(tokenizer, prompt_ids)
    mask = None if settings.constraint is None else grammar_processor(
        settings.constraint, tokenizer, vocab_size=model.config.vocab_size, eos_ids=settings.eos_ids,
        start=len(prompt_ids) - cached, reasoning=reasoning)
    masks = [] if mask is None else [mask]
    return _run(model, tokenizer, cache, prompt_ids, cached, settings, budget, gen, reasoning, tools, on_prefilled,
                masks)


def _run(model, tokenizer, cache, prompt_ids, cached, settings, budget, gen, reasoning, tools, on_prefilled, masks):
    processors: list = []
    if settings.repetition_penalty is not None:
        from mlx_lm.sample_utils import make_logits_processors

        tail = mx.array(prompt_ids[max(0, cached - REPETITION_CONTEXT):cached], dtype=mx.int32)
        for proc in make_logits_processors(repetition_penalty=settings.repetition_penalty,
                                           repetition_context_size=REPETITION_CONTEXT):
            processors.append(lambda toks, logits, p=proc: p(mx.concatenate([tail, toks]), logits))
    if reasoning and settings.reasoning_budget is not None:
        processors.append(budget_processor(tokenizer, settings.reasoning_budget, len(prompt_ids) - cached))
    processors += masks
    key = mx.random.key(settings.seed) if settings.seed is not None else None
    detok = tokenizer.detokenizer
    splitter = ReasoningSplitter(in_reasoning=reasoning)
    parser = ToolCallParser(tools) if tools else None
    stats = GenerationStats(prompt_tokens=len(prompt_ids), prefill_tokens=len(prompt_ids) - cached,
                            context_tokens=len(prompt_ids), context_limit=settings.context_limit)
    stops = StopStrings(settings.stop, in_reasoning=reasoning)
    emitted = 0
    mx.reset_peak_memory()
    tokens = gen(model, cache, mx.array(prompt_ids[cached:], dtype=mx.int32), settings.params,
                 key=key, logits_processors=processors, prefill_step=settings.prefill_step,
                 on_prefilled=on_prefilled, should_stop=settings.should_stop)
    t0 = time.perf_counter()
    t_first = t0
    try:
        for n, tok in enumerate(tokens, start=1):
            now = time.perf_counter()
            if n == 1:
                t_first = now
                stats.prompt_tps = stats.prefill_tokens / max(now - t0, 1e-9)
            else:
                stats.generation_tps = (n - 1) / max(now - t_first, 1e-9)
            stats.generation_tokens = n
            spec = getattr(gen, "stats", None)
            if spec is not None:
                stats.draft_depth = spec.depth
                stats.acceptance = [round(a, 3) for a in spec.acceptance]
                stats.tokens_per_verify = spec.tokens_per_verify
            stats.context_tokens = len(prompt_ids) + n
            finish = None
            if tok in settings.eos_ids:
                finish = "stop"
            else:
                detok.add_token(tok)
            if finish is None and n >= budget:
                finish = "length"
            if finish is not None:
                detok.finalize()
            text = detok.text
            cut = stops.cut(text, emitted, final=finish is not None)
            if cut.stopped:
                finish = "stop"
            delta = text[emitted:cut.end]
            emitted = max(emitted, cut.end)
            r, a = splitter.feed(delta)
            if finish is not None:
                r2, a2 = splitter.finish()
                r, a = r + r2, a + a2
            if reasoning and not stats.reasoning_tokens and (splitter.reasoning_done or finish is not None):
                stats.reasoning_tokens = n
            calls: list[ToolCall] = []
            if parser is not None:
                events = parser.feed(a)
                if finish is not None:
                    events += parser.finish()
                a = "".join(e for e in events if isinstance(e, str))
                calls = [e for e in events if isinstance(e, ToolCall)]
            if finish is not None:
                stats.peak_memory_gb = _peak_gb()
            yield GenerationChunk(text=delta, token_ids=[tok], finish_reason=finish, stats=replace(stats),
                                  reasoning=r, content=a, tool_calls=calls)
            if finish is not None:
                return
    finally:
        tokens.close()
