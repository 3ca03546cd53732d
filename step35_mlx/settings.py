"""Generation settings: the call's arguments over the checkpoint's ``generation_config.json`` over fallbacks.

:func:`resolve_settings` validates everything once, before a request runs, into one
:class:`Settings`; :func:`resolve_mtp` decides plain vs MTP decoding.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .grammar import Constraint
from .sampling import SamplingParams
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
    should_stop: Callable[[], bool] | None = None  # asked before each prefill chunk: True abandons the request

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
    should_stop: Callable[[], bool] | None = None,
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
        should_stop=should_stop,
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
