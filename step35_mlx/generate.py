"""Streaming text generation: ``stream_generate`` / ``generate`` and the token loop ``ar_tokens``.

Layers, from the bottom:

- a *token generator* ``gen(model, cache, prompt, params, *, key, logits_processors,
  prefill_step, on_prefilled=None) -> Iterator[int]``. ``cache`` already holds some
  prefix; ``prompt`` (1-D, non-empty) is the rest, which the generator prefills in
  chunks before yielding sampled token ids forever. When the consumer stops after
  token ``t``, the cache holds prefix + prompt + every yielded token up to ``t``,
  possibly followed by extra positions (the caller trims them). ``on_prefilled()`` is
  called once, when the cache holds the whole prompt and nothing else. ``ar_tokens``
  is plain autoregressive decoding; :func:`token_generator` is the one place that
  picks the generator (MTP speculative decoding plugs in there).
- :func:`run` turns such a stream into :class:`GenerationChunk` s: detokenizing
  (mlx-lm's streaming detokenizer), eos and stop strings, ``max_tokens``, the
  reasoning / answer split and tool-call parsing, and statistics. ``ChatSession``
  calls it with a cache that already holds the conversation.
- :func:`stream_generate` / :func:`generate`: prompt in (text, token ids or chat
  messages), chunks or text out.

All sampling goes through :mod:`step35_mlx.sampling`, the one definition of the
target distribution.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import mlx.core as mx

from .distributed.sync import root_tokens
from .grammar import Constraint, constraint_for, grammar_processor
from .reasoning import THINK_CLOSE, THINK_OPEN, ReasoningSplitter
from .sampling import SamplingParams, sample_token
from .text import check_text
from .thinking import AnswerStart, budget_processor
from .tool_calls import ToolCall, ToolCallParser
from .tuned import load_choice

# Fallbacks when neither the call nor the checkpoint's generation_config.json sets a value.
# StepFun's own examples sample at temperature 1.0; the rest are common defaults.
FALLBACK_SETTINGS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 0.95,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": None,
    "max_tokens": 8192,
}
REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back over (mlx-lm's default)
DEFAULT_DRAFT_DEPTH = 2  # MTP drafts per step when MTP is on and neither --draft-depth nor `tune` chose one


# ---------------------------------------------------------------- results


@dataclass
class GenerationStats:
    """Counts and speeds of one generation.

    ``prompt_tokens`` is the whole prompt; ``prefill_tokens`` the part that was actually
    run through the model (the rest was already in the cache, see ``ChatSession``).
    ``prompt_tps`` is prefill tokens per second of time-to-first-token;
    ``generation_tps`` is decode steps per second after the first token.
    """

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    context_tokens: int = 0
    context_limit: int = 0
    draft_depth: int = 0  # 0: plain decoding
    acceptance: list[float] = field(default_factory=list)  # MTP: P(draft i accepted | earlier ones were)
    tokens_per_verify: float = 0.0
    cached_from: str = ""  # where the cached prompt tokens came from: "session", "ram", "disk" (prefix cache)
    reasoning_tokens: int = 0  # generated tokens up to and including the one that closed </think>

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class GenerationChunk:
    """One step of a stream: ``text`` is the new raw text (reasoning, tags and all, minus eos/stop strings).

    ``reasoning`` / ``content`` split ``text`` at ``</think>`` (tags and their newlines
    removed); with ``tools`` the calls are taken out of ``content`` and appear, once
    complete, in ``tool_calls``. ``finish_reason`` is ``None`` until the last chunk:
    ``"stop"`` (eos token or stop string) or ``"length"`` (``max_tokens``).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: GenerationStats
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


# ---------------------------------------------------------------- settings


def read_generation_config(path: str | Path, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sampling defaults from ``generation_config.json`` in a checkpoint folder (``{}`` if there is none).

    Maps HF names to ours (``max_new_tokens`` -> ``max_tokens``); ``do_sample: false``
    means greedy (temperature 0); ``repetition_penalty`` 1.0 means none. A file that cannot
    be read as a JSON object is ignored with a warning naming it (``warn``, else ``warnings.warn``).
    """
    f = Path(path)
    if f.is_dir():
        f = f / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        message = f"warning: ignoring {f} ({e}); using the built-in sampling defaults"
        if warn is None:
            warnings.warn(message, stacklevel=2)
        else:
            warn(message)
        return {}
    out: dict[str, Any] = {}
    for ours, theirs, kind in (("temperature", "temperature", float), ("top_p", "top_p", float),
                               ("top_k", "top_k", int), ("min_p", "min_p", float),
                               ("repetition_penalty", "repetition_penalty", float),
                               ("max_tokens", "max_new_tokens", int)):
        v = data.get(theirs)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[ours] = kind(v)
    if out.get("repetition_penalty") == 1.0:
        out["repetition_penalty"] = None
    if data.get("do_sample") is False:
        out["temperature"] = 0.0
    eos = data.get("eos_token_id")
    if isinstance(eos, int):
        eos = [eos]
    if isinstance(eos, list):
        out["eos_token_id"] = [int(e) for e in eos if isinstance(e, int)]
    return out


def model_generation_config(model: Any, tokenizer: Any) -> dict[str, Any]:
    """The checkpoint's generation defaults: ``model.generation_config`` if set, else the tokenizer's folder."""
    cfg = getattr(model, "generation_config", None)
    if isinstance(cfg, dict):
        return cfg
    name = getattr(tokenizer, "name_or_path", None)
    if isinstance(name, str) and name and Path(name).is_dir():
        return read_generation_config(name)
    return {}


@dataclass
class Settings:
    """Resolved generation settings (call > generation_config.json > ``FALLBACK_SETTINGS``)."""

    params: SamplingParams
    max_tokens: int | None  # None: fill up to FALLBACK max_tokens, clamped to the context
    repetition_penalty: float | None
    seed: int | None
    stop: list[str]
    prefill_step: int
    eos_ids: frozenset[int]
    context_limit: int
    mtp: bool | None
    draft_depth: int | None
    default_max_tokens: int
    clamp_max_tokens: bool = False  # max_tokens past the context: stop at the context ("length"), not ValueError
    reasoning_budget: int | None = None  # close </think> after this many generated tokens (see thinking.py)
    constraint: Constraint | None = None  # the answer's required shape (response_format, forced tools)

    def budget(self, prompt_tokens: int) -> int:
        """``max_tokens`` for a prompt of this length; ``ValueError`` when it does not fit the context."""
        limit = self.context_limit
        if prompt_tokens >= limit:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens; the context limit is {limit} tokens "
                "(shorten the prompt or the conversation)"
            )
        if self.max_tokens is None:
            return min(self.default_max_tokens, limit - prompt_tokens)
        if prompt_tokens + self.max_tokens > limit:
            if self.clamp_max_tokens:
                return limit - prompt_tokens
            raise ValueError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({self.max_tokens}) = "
                f"{prompt_tokens + self.max_tokens} tokens exceeds the context limit of {limit} tokens; "
                f"lower max_tokens to at most {limit - prompt_tokens} or shorten the prompt"
            )
        return self.max_tokens


def resolve_settings(
    model: Any,
    tokenizer: Any,
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
    max_context: int | None = None,
    mtp: bool | None = None,
    draft_depth: int | None = None,
    generation_config: dict | None = None,
    clamp_max_tokens: bool = False,
    reasoning_budget: int | None = None,
    constraint: Constraint | dict | None = None,
) -> Settings:
    gc = model_generation_config(model, tokenizer) if generation_config is None else generation_config

    def pick(name: str, value: Any) -> Any:
        if value is not None:
            return value
        if name in gc:
            return gc[name]
        return FALLBACK_SETTINGS[name]

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if reasoning_budget is not None and (isinstance(reasoning_budget, bool) or reasoning_budget < 0):
        raise ValueError(f"reasoning_budget must be >= 0, got {reasoning_budget}")
    if prefill_step < 1:
        raise ValueError(f"prefill_step must be >= 1, got {prefill_step}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    params = SamplingParams(
        temperature=float(pick("temperature", temperature)),
        top_p=float(pick("top_p", top_p)),
        top_k=int(pick("top_k", top_k)),
        min_p=float(pick("min_p", min_p)),
    )
    rp = pick("repetition_penalty", repetition_penalty)
    if rp is not None and rp <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {rp}")
    eos = set(getattr(model.config, "eos_token_id", None) or [])
    eos |= set(getattr(tokenizer, "eos_token_ids", None) or [])
    eos |= set(gc.get("eos_token_id", []))
    mtp, draft_depth = resolve_mtp(model, mtp, draft_depth)
    limit = int(max_context or model.config.max_position_embeddings)
    if max_context is not None and max_context > model.config.max_position_embeddings:
        raise ValueError(
            f"max_context {max_context} is larger than the model's {model.config.max_position_embeddings} positions"
        )
    if isinstance(stop, str):
        stop = [stop]
    return Settings(
        params=params,
        max_tokens=max_tokens,
        repetition_penalty=None if rp in (None, 1.0) else float(rp),
        seed=seed,
        stop=[s for s in (stop or []) if s],
        prefill_step=int(prefill_step),
        eos_ids=frozenset(int(e) for e in eos),
        context_limit=limit,
        mtp=mtp,
        draft_depth=draft_depth,
        default_max_tokens=int(gc.get("max_tokens") or FALLBACK_SETTINGS["max_tokens"]),
        clamp_max_tokens=bool(clamp_max_tokens),
        reasoning_budget=reasoning_budget,
        constraint=Constraint.coerce(constraint),
    )


def resolve_mtp(model: Any, mtp: bool | None, draft_depth: int | None) -> tuple[bool, int | None]:
    """Decide plain vs MTP decoding: explicit flags, else ``step35-mlx tune``'s stored choice, else plain.

    Plain is the untuned default because the winner depends on the chip: on MLX's CPU
    build verify rows cost nearly linear time, so MTP rarely wins there; on a Mac GPU
    fewer weight bytes per token usually do. ``tune`` measures it once per model.
    """
    available = getattr(model, "num_mtp", 0)
    if mtp is None and draft_depth is None:
        path = getattr(model, "source_path", None)
        if path is None or not available:
            return False, None
        tuned = load_choice(path)
        return (bool(tuned), tuned or None) if tuned is not None else (False, None)
    if draft_depth is not None and (isinstance(draft_depth, bool) or not isinstance(draft_depth, int)
                                    or draft_depth < 1):
        raise ValueError(f"draft_depth must be 1, 2 or 3 (MTP draft tokens per step), got {draft_depth!r}; "
                         "use --no-mtp for plain decoding")
    if mtp is False:
        return False, None
    depth = DEFAULT_DRAFT_DEPTH if draft_depth is None else draft_depth
    if not available:
        raise ValueError("this checkpoint has no MTP modules (num_nextn_predict_layers is 0); run without --mtp")
    if not 1 <= depth <= available:
        raise ValueError(f"--draft-depth must be between 1 and {available} for this checkpoint, got {depth}")
    return True, depth


def new_cache(model: Any, kv_bits: int | None = None, kv_group_size: int | None = None) -> list:
    """``model.make_cache()``, quantized with ``kv_bits``; checks the settings fit the model first.

    ``kv_group_size`` ``None`` picks 64, or 32 when 64 does not divide the head dims.
    """
    if kv_bits is None:
        return model.make_cache()
    if kv_bits not in (4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    cfg = model.config
    dims = {cfg.head_dim, getattr(cfg, "sliding_head_dim", None) or cfg.head_dim}
    if kv_group_size is None:
        kv_group_size = 64 if all(d % 64 == 0 for d in dims) else 32
    bad = sorted(d for d in dims if d % kv_group_size)
    if bad:
        raise ValueError(f"kv group size {kv_group_size} does not divide the model's head dim {bad[0]}")
    return model.make_cache(kv_bits=kv_bits, kv_group_size=kv_group_size)


# ---------------------------------------------------------------- token generators


class TokenGenerator(Protocol):
    def __call__(self, model: Any, cache: list, prompt: mx.array, params: SamplingParams, *,
                 key: mx.array | None, logits_processors: list | None, prefill_step: int,
                 on_prefilled: Callable[[], None] | None = None) -> Iterator[int]: ...


def _eval_cache(cache: list) -> None:
    mx.eval([[c.keys, c.values] for c in cache if c.keys is not None])


def _trunk(model: Any):
    return getattr(model, "trunk", model)


def last_logits(model: Any, tokens: mx.array, cache: list) -> mx.array:
    """Logits ``[1, V]`` of the last position of ``tokens`` ``[1, T]`` (the LM head runs on that position only)."""
    if hasattr(model, "trunk"):
        return model.logits(model.trunk(tokens, cache)[:, -1, :])
    return model(tokens, cache)[:, -1, :]


def prefill(model: Any, cache: list, tokens: mx.array, prefill_step: int = 512) -> None:
    """Run ``tokens`` (1-D) through the trunk into ``cache`` in chunks of ``prefill_step`` (no LM head)."""
    tokens = tokens.reshape(-1)
    for i in range(0, tokens.size, prefill_step):
        _trunk(model)(tokens[i:i + prefill_step][None], cache)
        _eval_cache(cache)
        mx.clear_cache()


def ar_tokens(
    model: Any,
    cache: list,
    prompt: mx.array,
    params: SamplingParams,
    *,
    key: mx.array | None = None,
    logits_processors: list | None = None,
    prefill_step: int = 512,
    on_prefilled: Callable[[], None] | None = None,
) -> Iterator[int]:
    """Plain autoregressive decoding: prefill ``prompt`` (chunks of ``prefill_step``), then one token per step.

    The next step is queued with ``mx.async_eval`` before the current token is handed
    out, so the device works while the caller detokenizes and prints. Every yielded
    token has therefore been fed to the cache already (see the module docstring).
    """
    prompt = prompt.reshape(-1).astype(mx.int32)
    if prompt.size == 0:
        raise ValueError("the prompt must contain at least one token that is not in the cache")
    processors = list(logits_processors or [])
    history = prompt

    def next_key() -> mx.array | None:
        nonlocal key
        if key is None:
            return None
        key, sub = mx.random.split(key)
        return sub

    def pick(logits: mx.array, hist: mx.array) -> mx.array:
        for proc in processors:
            logits = proc(hist, logits)
        return root_tokens(model, sample_token(logits, params, next_key()).astype(mx.int32))

    # All but the last token go through the trunk with only the cache evaluated, so no position but
    # the last runs the final layer's FFN (no cache needs it), as in mlx-lm; the last token gives the logits.
    last = prompt.size - 1
    prefill(model, cache, prompt[:last], prefill_step)
    y = pick(last_logits(model, prompt[last:][None], cache), history)
    mx.async_eval(y)
    if on_prefilled is not None:
        on_prefilled()
    n = 0
    while True:
        if processors:
            history = mx.concatenate([history, y])
        next_y = pick(last_logits(model, y[None], cache), history)
        mx.async_eval(next_y)
        yield int(y.item())
        y = next_y
        n += 1
        if n % 256 == 0:
            mx.clear_cache()


def token_generator(mtp: bool | None = None, draft_depth: int | None = None) -> TokenGenerator:
    """The one place that chooses the decoding loop for a request: plain, or MTP with ``draft_depth`` drafts."""
    if not mtp:
        return ar_tokens
    from .speculative import MTPDecoder

    return MTPDecoder(draft_depth or DEFAULT_DRAFT_DEPTH)


# ---------------------------------------------------------------- prompts


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


# ---------------------------------------------------------------- the chunk stream


def _hold_for_stop(text: str, stops: list[str]) -> int:
    best = 0
    for s in stops:
        for k in range(min(len(text), len(s) - 1), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


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
    stops = settings.stop
    answer = AnswerStart(in_reasoning=reasoning)  # stop strings apply to the answer only
    emitted = 0
    mx.reset_peak_memory()
    tokens = gen(model, cache, mx.array(prompt_ids[cached:], dtype=mx.int32), settings.params,
                 key=key, logits_processors=processors, prefill_step=settings.prefill_step,
                 on_prefilled=on_prefilled)
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
            delta_end = len(text)
            answer_at = answer.position(text) if stops else None
            if stops and answer_at is not None:
                start = max(answer_at, emitted - max(len(s) for s in stops) + 1)
                hits = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
                if hits:
                    delta_end = min(hits)[0]
                    finish = "stop"
                elif finish is None:
                    delta_end = max(emitted, len(text) - _hold_for_stop(text[answer_at:], stops))
            delta = text[emitted:delta_end]
            emitted = max(emitted, delta_end)
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


# ---------------------------------------------------------------- public API


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
    """
    settings = resolve_settings(
        model, tokenizer, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
        prefill_step=prefill_step, max_context=max_context, mtp=mtp, draft_depth=draft_depth,
        generation_config=generation_config, reasoning_budget=reasoning_budget, clamp_max_tokens=clamp_max_tokens,
        constraint=constraint_for(response_format, tools, tool_choice, parallel_tool_calls),
    )
    ids = encode_prompt(tokenizer, prompt_or_messages, tools)
    cache = new_cache(model, kv_bits, kv_group_size)
    from .vision.inputs import prepare

    prepared = prepare(model, tokenizer, prompt_or_messages, ids)
    if prefix_cache is not None:
        from .prefix_cache.stream import cached_stream

        return cached_stream(prepared.model, tokenizer, cache, prepared.ids, settings, prefix_cache, tools,
                             keys=prepared.keys)
    return run(prepared.model, tokenizer, cache, prepared.ids, 0, settings, tools=tools)


def generate(model: Any, tokenizer: Any, prompt_or_messages: Any, **kwargs: Any) -> str:
    """The whole generated text (raw: for chat prompts it holds the reasoning, ``</think>`` and the answer).

    Takes the arguments of :func:`stream_generate`. Use
    ``step35_mlx.reasoning.split_reasoning`` to separate reasoning and answer.
    """
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt_or_messages, **kwargs))
