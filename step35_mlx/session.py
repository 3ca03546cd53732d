"""Multi-turn chat that keeps its KV cache between turns and prefills only new tokens.

Each turn renders the whole conversation with the checkpoint's chat template and
reuses the longest prefix the cache can provide exactly:

1. the live cache (what the previous turn left), trimmed back to where the new
   rendering diverges from it; or
2. the snapshot taken when the prompt of the first reply after the latest user
   message had been prefilled, trimmed back a few tokens.

(2) exists because of the released template: it drops the reasoning of assistant
turns that precede the last user message. The previous prompt ended with
``<|im_start|>assistant\\n<think>\\n`` and the reasoning followed it; the re-rendered
history continues ``<|im_start|>assistant\\n{answer}`` instead, so the live cache
diverges right there - and the sliding-window layers can no longer roll back that
far once the reply is longer than their slack. The snapshot holds the sliding
layers' rings as they were at the end of that prompt (new arrays; the cache's own
arrays are updated in place); the full-attention layers need no copy, since their
cache can be trimmed back to any position. Only when neither source is exact
(e.g. the system prompt changed) is the whole conversation prefilled again.

With ``prefix_cache=`` (a :class:`~step35_mlx.prefix_cache.PrefixCache`, shared by
many sessions, clients and restarts) a third source is the longest prefix that cache
holds; the session then also stores the state at the end of the system prompt and
tools, at the end of every prompt and at the end of every reply there.

The number of tokens prefilled is counted (``last_stats.prefill_tokens``,
``prefilled_tokens`` over the session) so tests can check the reuse.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx

from .cache import SlidingKVCache, _parts
from .chunks import run
from .decode import new_cache, prefill
from .prefix_cache.snapshots import RingSnapshot, ring_max_back
from .reasoning import split_reasoning
from .results import GenerationChunk, GenerationStats
from .session_file import SESSION_FORMAT, SESSION_VERSION, read_session_file, write_session_file
from .settings import Settings, resolve_settings
from .tool_calls import parse_tool_calls
from .vision.inputs import FeatureCache, image_sources
from .vision.inputs import prepare as prepare_images

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "seed", "stop", "prefill_step", "max_context", "mtp", "draft_depth")


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Snapshot:
    tokens: list[int]
    rings: dict[int, RingSnapshot]  # layer index -> ring state (sliding layers only)


@dataclass
class _Head:
    """Tokens prefilled before ``run`` (up to the end of the system prompt and tools) and the time they took."""

    tokens: int = 0
    seconds: float = 0.0
    stopped: bool = False  # settings.should_stop stopped it

    def count_in(self, stats: GenerationStats, reuse: str) -> None:
        """Add the head's prefill to a chunk's statistics (``run`` counted only the rest)."""
        stats.cached_from = {"cache": "session", "snapshot": "session", "none": ""}.get(reuse, reuse[7:])
        if not self.tokens:
            return
        rest = stats.prefill_tokens / stats.prompt_tps if stats.prompt_tps else 0.0
        stats.prefill_tokens += self.tokens
        stats.prompt_tps = stats.prefill_tokens / max(rest + self.seconds, 1e-9)


def _model_fingerprint(model: Any) -> str:
    raw = getattr(model.config, "raw", None) or {}
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ChatSession:
    """A conversation with a model: the messages, and a KV cache that follows them.

    ``ChatSession(model, tokenizer, system=None, tools=None, **defaults)``; defaults are
    the sampling arguments of :func:`step35_mlx.generate.stream_generate`
    (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``repetition_penalty``, ``seed``, ``stop``, ``prefill_step``, ``max_context``,
    ``mtp``, ``draft_depth``, ``generation_config``). ``messages=`` starts from an
    existing history.

    ``send(text)`` streams the reply as :class:`GenerationChunk` s; ``ask(text)`` returns
    the answer. Stopping a ``send`` stream early (``close()``, Ctrl-C) keeps the
    partial reply in the history; so does a ``should_stop=`` callable (a per-turn setting of
    ``send``/``respond``/``generate_for``) that stops the prompt's prefill between chunks: the
    turn then yields nothing and the cache keeps the chunks already run. ``add_tool_result(name, content)`` then
    ``respond()`` continues after tool calls. ``prefix_cache=`` shares cached prefixes
    with other sessions (see the module docstring).
    """

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None, tools: list[dict] | None = None,
                 *, messages: list[dict] | None = None, generation_config: dict | None = None,
                 kv_bits: int | None = None, kv_group_size: int | None = None, prefix_cache: Any = None,
                 **defaults: Any) -> None:
        unknown = set(defaults) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown ChatSession setting(s): {', '.join(sorted(unknown))}")
        self.model = model
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        self.defaults = dict(defaults)
        self.generation_config = generation_config
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.prefix_cache = prefix_cache
        self.messages: list[dict] = [dict(m) for m in (messages or [])]
        if system is not None:
            self.set_system(system)
        self.prefilled_tokens = 0  # tokens run through the model in prefill, over the session
        self._active: Iterator[GenerationChunk] | None = None  # a reply stream not yet finished
        self.last_stats: GenerationStats | None = None
        self.last_reuse: str = "none"  # where the last turn's cached prefix came from
        self.image_features = FeatureCache()  # vision features by pixel hash (Step 3.7)
        self._new_cache()
        if prefix_cache is not None:
            prefix_cache.check_format(self.cache)
        self.settings()  # validate the defaults now

    # ------------------------------------------------------------ state

    def _new_cache(self) -> None:
        self.cache = new_cache(self.model, self.kv_bits, self.kv_group_size)
        self.cache_tokens: list[int] = []
        self._snapshot: _Snapshot | None = None

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0].get("role") == "system":
            return self.messages[0].get("content")
        return None

    def set_system(self, text: str | None) -> None:
        """Set (or with ``None`` remove) the system prompt; the next turn re-prefills from the start."""
        if self.messages and self.messages[0].get("role") == "system":
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and the cache."""
        self._finish_active()
        self.messages = [m for m in self.messages[:1] if m.get("role") == "system"]
        self.last_stats = None
        self._new_cache()

    def settings(self, **overrides: Any) -> Settings:
        kw = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return resolve_settings(self.model, self.tokenizer, generation_config=self.generation_config, **kw)

    @property
    def context_tokens(self) -> int:
        """Tokens the cache holds now."""
        return len(self.cache_tokens)

    @property
    def context_limit(self) -> int:
        return self.settings().context_limit

    def render(self, messages: list[dict] | None = None) -> list[int]:
        """Token ids of ``messages`` (default: the history) with the generation prompt."""
        msgs = self.messages if messages is None else messages
        return list(self.tokenizer.apply_chat_template(msgs, tools=self.tools, add_generation_prompt=True))

    # ------------------------------------------------------------ turns

    def send(self, text: str, images: Sequence[Any] | None = None, **overrides: Any) -> Iterator[GenerationChunk]:
        """Add a user message and stream the reply. Raises ``ValueError`` up front if it cannot fit the context.

        ``images`` (paths, bytes or ``PIL.Image`` s) go before the text, for a Step 3.7 model.
        """
        self._finish_active()
        content: Any = text
        if images:
            content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        return self._turn(self.messages + [{"role": "user", "content": content}], overrides)

    def ask(self, text: str, images: Sequence[Any] | None = None, **overrides: Any) -> str:
        """``send`` and return the answer (reasoning and tool-call markup excluded)."""
        for _ in self.send(text, images, **overrides):
            pass
        return self.messages[-1].get("content") or ""

    def respond(self, **overrides: Any) -> Iterator[GenerationChunk]:
        """Stream a reply to the history as it is (after ``add_tool_result``, or a history ending with a user message)."""
        self._finish_active()
        if not self.messages or self.messages[-1].get("role") == "assistant":
            raise ValueError("nothing to respond to: the history is empty or ends with an assistant message")
        return self._turn(list(self.messages), overrides)

    def generate_for(self, messages: list[dict], tools: list[dict] | None = None,
                     **overrides: Any) -> Iterator[GenerationChunk]:
        """Replace the history with ``messages`` (and the tools) and stream a reply to it.

        For servers whose clients resend the whole conversation every turn: the cache keeps
        the longest prefix of the new rendering it can provide exactly, as in ``send``.
        """
        self._finish_active()
        self.tools = list(tools) if tools else None
        return self._turn([dict(m) for m in messages], overrides)

    def add_tool_result(self, name: str, content: Any) -> None:
        """Append a tool's result (``content`` that is not a string is JSON-encoded)."""
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
        self.messages.append({"role": "tool", "name": name, "content": content})

    def _turn(self, messages: list[dict], overrides: dict) -> Iterator[GenerationChunk]:
        settings = self.settings(**overrides)
        ids = self.render(messages)
        prepared = prepare_images(self.model, self.tokenizer, messages, ids, self.image_features)
        # Prefix reuse compares `keys`: image tokens carry a hash of their image's pixels there.
        model, ids, keys = prepared.model, prepared.ids, prepared.keys
        settings.budget(len(ids))  # ValueError before anything changes
        self.messages = messages
        first_reply = not any(m.get("role") == "assistant" for m in self._since_last_user())
        cached = self._reuse(keys)
        head = self._prefill_head(messages, ids, cached, settings)
        pc = self.prefix_cache

        def on_prefilled() -> None:
            # The cache holds exactly `ids`: keep the sliding rings for the next user turn.
            if first_reply:
                rings = {i: RingSnapshot.take(c) for i, c in enumerate(self.cache) if isinstance(c, SlidingKVCache)}
                mx.async_eval([[r.keys, r.values] for r in rings.values()])
                self._snapshot = _Snapshot(list(keys), rings)
            if pc is not None:
                pc.capture(self.cache, keys)

        if head.stopped:
            chunks: Iterator[GenerationChunk] = (c for c in ())
        else:
            chunks = run(model, self.tokenizer, self.cache, ids, cached + head.tokens, settings,
                         reasoning=True, tools=self.tools, on_prefilled=on_prefilled)
        self._active = self._consume(chunks, keys, cached, head)
        return self._active

    def _prefill_head(self, messages: list[dict], ids: list[int], cached: int, settings: Settings) -> "_Head":
        """With a prefix cache: prefill up to the end of the system prompt and tools and store that state there,
        so other conversations with the same system prompt and tools hit it."""
        pc = self.prefix_cache
        if pc is None:
            return _Head()
        head = messages[:1] if messages and messages[0].get("role") == "system" else []
        if not head and not self.tools:
            return _Head()
        try:
            prefix = list(self.tokenizer.apply_chat_template(head, tools=self.tools, add_generation_prompt=False))
        except Exception:  # noqa: BLE001 - a template that cannot render the head alone: no boundary
            return _Head()
        end = len(prefix)
        if not cached < end < len(ids) - 1 or ids[:end] != prefix:
            return _Head()
        t0 = time.perf_counter()
        done = prefill(self.model, self.cache, mx.array(ids[cached:end], dtype=mx.int32), settings.prefill_step,
                       should_stop=settings.should_stop)
        self.cache_tokens = list(ids[:min(c.offset for c in self.cache)])  # `end` unless stopped
        if not done:  # settings.should_stop: the turn ends interrupted, the cache holding whole chunks
            return _Head(stopped=True)
        pc.capture(self.cache, self.cache_tokens)
        return _Head(end - cached, time.perf_counter() - t0)

    def _finish_active(self) -> None:
        """Close a reply stream that was started but not finished (its partial reply is kept)."""
        active, self._active = self._active, None
        if active is None:
            return
        if inspect.getgeneratorstate(active) == inspect.GEN_CREATED:
            self._store_reply("", None)  # never started: an empty, interrupted reply keeps the turns paired
        active.close()

    def _consume(self, chunks: Iterator[GenerationChunk], ids: list[int], cached: int,
                 head: "_Head") -> Iterator[GenerationChunk]:
        generated: list[int] = []
        raw: list[str] = []
        finish = None
        try:
            for chunk in chunks:
                generated += chunk.token_ids
                raw.append(chunk.text)
                head.count_in(chunk.stats, self.last_reuse)
                self.last_stats = chunk.stats
                finish = chunk.finish_reason
                yield chunk
        finally:
            chunks.close()
            self._active = None
            # a turn stopped in prefill (`should_stop`) ran only the chunks its cache holds
            reached = len(ids) if generated else min([len(ids)] + [c.offset for c in self.cache])
            self.prefilled_tokens += max(0, reached - cached)
            self._settle(ids + generated)
            self._store_reply("".join(raw), finish)
            if self.prefix_cache is not None:
                self.prefix_cache.capture(self.cache, self.cache_tokens)
                self.prefix_cache.flush()

    def _since_last_user(self) -> list[dict]:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].get("role") == "user":
                return self.messages[i + 1:]
        return self.messages

    def _store_reply(self, text: str, finish: str | None) -> None:
        reasoning, answer = split_reasoning(text, in_reasoning=True)
        msg: dict[str, Any] = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
        if self.tools:
            answer, calls = parse_tool_calls(answer, self.tools)
            msg["content"] = answer
            if calls:
                msg["tool_calls"] = [c.to_dict() for c in calls]
        if finish is None:
            msg["interrupted"] = True
        self.messages.append(msg)

    # ------------------------------------------------------------ cache reuse

    def _reuse(self, ids: list[int]) -> int:
        """Put the cache in the state that holds the longest exact prefix of ``ids``; returns its length."""
        limit = len(ids) - 1  # at least one token must be run to get logits
        full_layers = [c for c in self.cache if not isinstance(c, SlidingKVCache)]
        rings = [(i, c) for i, c in enumerate(self.cache) if isinstance(c, SlidingKVCache)]

        best, source = 0, "none"
        live = min(_lcp(self.cache_tokens, ids), limit)
        if live and len(self.cache_tokens) - live <= min(c.max_trim() for c in self.cache):
            best, source = live, "cache"
        snap = self._snapshot
        if snap is not None and len(snap.rings) == len(rings):
            d = min(_lcp(snap.tokens, ids), limit, _lcp(self.cache_tokens, snap.tokens))
            back = len(snap.tokens) - d
            ok = all(back <= ring_max_back(c, snap.rings[i].offset, snap.rings[i].low) for i, c in rings)
            ok = ok and all(len(self.cache_tokens) - d <= c.max_trim() for c in full_layers)
            if ok and d > best:
                best, source = d, "snapshot"

        pc = self.prefix_cache
        hit = pc.restore(ids, self.cache, at_least=best) if pc is not None else None
        if hit is not None and hit.length:
            best, source = hit.length, f"prefix-{hit.tier}"
        elif source == "cache":
            for c in self.cache:
                c.trim(len(self.cache_tokens) - best)
        elif source == "snapshot":
            for c in full_layers:
                c.trim(len(self.cache_tokens) - best)
            for i, c in rings:
                snap.rings[i].put(c, best - len(snap.tokens) + snap.rings[i].offset)
        elif self.cache_tokens:
            self._new_cache()  # nothing reusable: prefill the whole conversation again
        self.cache_tokens = list(ids[:best])
        self.last_reuse = source
        return best

    def _settle(self, tokens: list[int]) -> None:
        """After a generation (finished or interrupted): make every layer hold the same exact prefix of ``tokens``."""
        target = min([len(tokens)] + [c.offset for c in self.cache])
        for c in self.cache:
            excess = c.offset - target
            if excess > c.max_trim():
                self._new_cache()
                return
            if excess:
                c.trim(excess)
        self.cache_tokens = list(tokens[:target])

    # ------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> Path:
        """Write the session (messages, settings, cache contents and tokens, snapshot) to one safetensors file."""
        self._finish_active()
        if image_sources(self.messages):
            raise ValueError("a conversation with images cannot be saved yet")
        path = Path(path)
        arrays: dict[str, mx.array] = {}
        layers = []
        def put(prefix: str, stored: Any, stop: int | None = None) -> None:
            for j, a in enumerate(_parts(stored)):
                arrays[f"{prefix}.{j}"] = a if stop is None else a[..., :stop, :]

        for i, c in enumerate(self.cache):
            sliding = isinstance(c, SlidingKVCache)
            entry: dict[str, Any] = {"kind": "sliding" if sliding else "full", "offset": c.offset,
                                     "bits": getattr(c, "bits", None), "group_size": getattr(c, "group_size", 64)}
            if sliding:
                entry.update(low=c.low, window=c.window, slack=c.slack, capacity=c.capacity)
            if c.keys is not None and c.offset > 0:
                entry["parts"] = len(_parts(c.keys))
                put(f"cache.{i}.keys", c.keys, None if sliding else c.offset)
                put(f"cache.{i}.values", c.values, None if sliding else c.offset)
            layers.append(entry)
        snap = None
        if self._snapshot is not None:
            snap = {"tokens": self._snapshot.tokens,
                    "rings": {str(i): {"offset": r.offset, "low": r.low, "parts": len(_parts(r.keys))}
                              for i, r in self._snapshot.rings.items()}}
            for i, r in self._snapshot.rings.items():
                put(f"snapshot.{i}.keys", r.keys)
                put(f"snapshot.{i}.values", r.values)
        meta = {
            "format": SESSION_FORMAT, "version": SESSION_VERSION, "model": _model_fingerprint(self.model),
            "messages": self.messages, "tools": self.tools,
            "defaults": {k: v for k, v in self.defaults.items()},
            "cache_tokens": self.cache_tokens, "layers": layers, "snapshot": snap,
            "prefilled_tokens": self.prefilled_tokens,
        }
        write_session_file(path, arrays, meta)
        return path

    def load(self, path: str | Path) -> "ChatSession":
        """Replace this session's state with a saved one (same model required); returns ``self``.

        The file is checked whole first (``ValueError`` saying what is wrong; ``FileNotFoundError``),
        so a damaged or crafted file leaves this session as it was.
        """
        self._finish_active()
        path = Path(path)
        specs = [self.model.config.layer(i) for i in range(len(self.model.layers))]
        saved = read_session_file(path, fingerprint=_model_fingerprint(self.model), make_cache=self.model.make_cache,
                                  layer_specs=specs, vocab_size=self.model.config.vocab_size,
                                  setting_names=_SAMPLING_KEYS)
        meta, arrays, cache, kw = saved.meta, saved.arrays, saved.cache, saved.cache_format
        layers = meta["layers"]

        def get(prefix: str, n: int) -> Any:
            parts = tuple(arrays[f"{prefix}.{j}"] for j in range(n))
            return parts if n > 1 else parts[0]

        for i, (c, entry) in enumerate(zip(cache, layers)):
            if isinstance(c, SlidingKVCache):
                c.low = entry["low"]
            c.offset = entry["offset"]
            if "parts" in entry:
                c.keys, c.values = get(f"cache.{i}.keys", entry["parts"]), get(f"cache.{i}.values", entry["parts"])
        self.cache = cache
        self.kv_bits, self.kv_group_size = kw.get("kv_bits"), kw.get("kv_group_size")
        self.cache_tokens = list(meta["cache_tokens"])
        self._snapshot = None
        snap = meta.get("snapshot")
        if snap is not None:
            self._snapshot = _Snapshot(list(snap["tokens"]), {
                int(i): RingSnapshot(get(f"snapshot.{i}.keys", r["parts"]), get(f"snapshot.{i}.values", r["parts"]),
                                   r["offset"], r["low"])
                for i, r in snap["rings"].items()
            })
        self.messages = meta["messages"]
        self.tools = meta.get("tools")
        self.defaults = {**meta.get("defaults", {}), **self.defaults}
        self.prefilled_tokens = meta.get("prefilled_tokens", 0)
        self.last_stats = None
        return self
