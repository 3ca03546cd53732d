"""Accumulate a generation into one reply: text, reasoning, tool calls, stop reasons and usage for both APIs."""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from ..results import GenerationChunk
from .engine import END, ClientGone, Engine, Run
from .errors import as_api_error


class Reply:
    """Everything a response needs from a chunk stream: texts, tool calls, finish reason, counts."""

    def __init__(self, engine: Engine, stops: list[str]) -> None:
        self.engine = engine
        self.stops = stops
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.text: list[str] = []
        self.tool_calls: list = []
        self.token_ids: list[int] = []
        self.finish: str | None = None
        self.stats = None
        self.stop_sequence: str | None = None
        self._held = ""  # trailing whitespace of the content, shown once more text follows
        self._after_call = False

    def add(self, c: GenerationChunk) -> str:
        """Take a chunk; returns the content to show now (whitespace-only content around tool calls is dropped)."""
        shown = self._gate(c.content, bool(c.tool_calls), c.finish_reason is not None)
        self.reasoning.append(c.reasoning)
        self.content.append(shown)
        self.text.append(c.text)
        self.tool_calls += c.tool_calls
        self.token_ids += c.token_ids
        self.stats = c.stats
        if c.finish_reason is not None:
            self.finish = c.finish_reason
            if c.finish_reason == "stop" and self.stops and c.token_ids and c.token_ids[-1] not in self.engine.eos_ids():
                self.stop_sequence = self._which_stop()
        return shown

    def _gate(self, content: str, calls: bool, final: bool) -> str:
        if self._after_call:
            content = content.lstrip()
            self._after_call = not content
        body = content.rstrip()
        out = ""
        if body:
            out, self._held = self._held + body, content[len(body):]
        else:
            self._held += content
        if calls:
            self._held, self._after_call = "", True
        if final:
            if not (self.tool_calls or calls):
                out += self._held
            self._held = ""
        return out

    def _which_stop(self) -> str | None:
        shown = len("".join(self.text))
        full = self.engine.tokenizer.decode(self.token_ids, skip_special_tokens=False)
        hits = [(full.find(s, max(0, shown - len(s))), s) for s in self.stops]
        hits = [h for h in hits if h[0] >= 0]
        return min(hits)[1] if hits else self.stops[0]

    @property
    def prompt_tokens(self) -> int:
        return self.stats.prompt_tokens if self.stats else 0

    @property
    def completion_tokens(self) -> int:
        return self.stats.generation_tokens if self.stats else 0

    @property
    def cached_tokens(self) -> int:
        return (self.stats.prompt_tokens - self.stats.prefill_tokens) if self.stats else 0

    def _call_cut(self) -> bool:
        """The token limit cut the last call before its ``</function>``: its arguments are incomplete."""
        return self.finish == "length" and bool(self.tool_calls) and "</function>" not in self.tool_calls[-1].raw

    def openai_finish(self) -> str | None:
        if self.tool_calls and not self._call_cut():
            return "tool_calls"
        return self.finish

    def anthropic_stop(self) -> str:
        if self.tool_calls and not self._call_cut():
            return "tool_use"
        if self.finish == "length":
            return "max_tokens"
        if self.stop_sequence is not None:
            return "stop_sequence"
        return "end_turn"

    def anthropic_usage(self) -> dict:
        """Anthropic's split: ``input_tokens`` excludes the prompt tokens read from the cache."""
        return anthropic_usage(self.stats, self.completion_tokens)

    def openai_usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}

    @property
    def reasoning_tokens(self) -> int:
        return self.stats.reasoning_tokens if self.stats else 0


def anthropic_usage(stats: Any, output_tokens: int) -> dict:
    cached = (stats.prompt_tokens - stats.prefill_tokens) if stats else 0
    return {"input_tokens": (stats.prompt_tokens if stats else 0) - cached, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def call_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {body}\n\n".encode()


async def collect(run: Run, first: GenerationChunk, reply: Reply, request: Request,
                   build: Callable[[Reply], Any]) -> Any:
    """Gather a whole reply for a non-streaming response: ``build(reply)``, or a 499 response when the
    client went away (a disconnect stops the generation)."""
    try:
        reply.add(first)
        item: Any = first
        while item.finish_reason is None:
            item = await run.next(request)
            if item is END:
                break
            if isinstance(item, BaseException):
                raise as_api_error(item)
            reply.add(item)
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        run.cancel()
    return build(reply)
