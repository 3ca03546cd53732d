"""What a generation returns: one :class:`GenerationChunk` per token, with running :class:`GenerationStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tool_calls import ToolCall


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
