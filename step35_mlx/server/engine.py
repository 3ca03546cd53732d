"""One model, one worker thread, a bounded queue; chunks stream back to asyncio through :class:`Run`."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import Request

from ..generate import GenerationChunk, stream_generate
from ..logprobs import TokenLogprobs, score
from ..session import ChatSession
from .errors import APIError, as_api_error


class ClientGone(Exception):
    pass


END = object()  # posted after the last chunk


class Run:
    """One generation on the worker thread; events come back through an asyncio queue."""

    def __init__(self, engine: "Engine", start: Callable[[Callable[[], bool]], Iterator[GenerationChunk]]) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.start = start
        self.done = False

    def _post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    def work(self) -> None:
        try:
            if self.cancelled.is_set():
                return
            gen = self.start(self.should_stop)
            if self.engine.channel is not None:  # several ranks: stop where rank 0 stops
                from ..distributed.serving import consume

                return consume(gen, self.engine.channel, self._post, self.cancelled.is_set)
            try:
                for chunk in gen:
                    self._post(chunk)
                    if chunk.finish_reason is not None or self.cancelled.is_set():
                        break
            finally:
                gen.close()  # an unfinished reply: the session settles its cache to a consistent prefix
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the request
            self._post(e)
        finally:
            self._post(END)
            try:
                self.loop.call_soon_threadsafe(self.engine._release)
            except RuntimeError:
                pass

    def cancel(self) -> None:
        self.cancelled.set()

    def should_stop(self) -> bool:
        """The generation's stop check, asked before each prefill chunk: whether the client went away."""
        self.engine.prefill_checks += 1
        return self.cancelled.is_set()

    async def next(self, request: Request | None = None) -> Any:
        """The next chunk, an exception, or ``END``; with ``request``, checks for a disconnect meanwhile."""
        while True:
            try:
                if request is None:
                    return await self.queue.get()
                return await asyncio.wait_for(self.queue.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    raise ClientGone() from None


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int, generation_config: dict | None,
                 defaults: dict, channel: Any = None, prefix_cache: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.channel = channel  # distributed.serving.JobChannel when the model is split across ranks
        self.prefix_cache = prefix_cache  # a PrefixCache shared by every request, or None
        self.session = ChatSession(model, tokenizer, generation_config=generation_config,
                                   prefix_cache=prefix_cache, **defaults)
        self.generation_config = generation_config
        self.defaults = defaults
        self.max_queue = max_queue
        self.inflight = 0  # accepted requests not finished (one running, the rest waiting)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step35-generate")
        self.served = 0
        # Prefill chunks begun (stop checks made) over the engine's life: shows a prefill is under way.
        self.prefill_checks = 0

    def close(self) -> None:
        """Stop the worker thread (after the generation in progress, if any), and the other ranks."""
        if self.channel is not None:
            self.executor.submit(self.channel.share_job, {"kind": "exit"}).result()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.prefix_cache is not None:
            self.prefix_cache.flush()

    def _release(self) -> None:
        self.inflight -= 1

    def eos_ids(self) -> frozenset[int]:
        return self.session.settings().eos_ids

    def submit(self, start: Callable[[Callable[[], bool]], Iterator[GenerationChunk]]) -> Run:
        """Queue ``start(should_stop)``, called on the worker thread; it returns the generation's chunks."""
        if self.inflight > self.max_queue:
            raise APIError(429, f"the server is busy: {self.inflight - 1} requests are waiting "
                                f"(the queue holds {self.max_queue}); retry later", kind="rate_limit_error")
        run = Run(self, start)
        self.inflight += 1
        self.served += 1
        self.executor.submit(run.work)
        return run

    def chat(self, messages: list[dict], tools: list[dict] | None, settings: dict) -> Run:
        return self._job({"kind": "chat", "messages": messages, "tools": tools, "settings": settings})

    def complete(self, prompt: str, settings: dict) -> Run:
        return self._job({"kind": "complete", "prompt": prompt, "settings": settings})

    def start_completion(self, prompt: str, settings: dict,
                         should_stop: Callable[[], bool] | None = None) -> Iterator[GenerationChunk]:
        kw = {**self.defaults, **{k: v for k, v in settings.items() if v is not None}}
        return stream_generate(self.model, self.tokenizer, prompt, prefix_cache=self.prefix_cache,
                               generation_config=self.generation_config, should_stop=should_stop, **kw)

    async def score(self, ids: list[int], top: int, start: int) -> TokenLogprobs:
        """Log-probabilities of ``ids`` (see :func:`step35_mlx.logprobs.score`), on the worker thread."""
        if self.channel is not None:
            raise APIError(400, "logprobs are not available when the model is split across machines (--parallel)")
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: score(self.model, ids, top, start))

    def _job(self, job: dict) -> Run:
        from ..distributed.serving import run_job

        def start(should_stop: Callable[[], bool]) -> Iterator[GenerationChunk]:
            if self.channel is not None:  # on the worker thread, so the ranks see jobs in order
                self.channel.share_job(job)
                return run_job(self, job)  # the ranks must stop together: between tokens only (`consume`)
            return run_job(self, job, should_stop)  # a client gone during prefill frees the worker within a chunk

        return self.submit(start)


async def first_chunk(run: Run, request: Request) -> GenerationChunk:
    """Wait for the first chunk (errors such as a prompt over the context surface here, before any response)."""
    try:
        item = await run.next(request)
    except ClientGone:
        raise
    except BaseException:
        run.cancel()
        raise
    if item is END:
        raise APIError(500, "generation ended without output", kind="server_error")
    if isinstance(item, BaseException):
        raise as_api_error(item)
    return item


async def drain(run: Run, first: GenerationChunk) -> AsyncIterator[GenerationChunk]:
    """The chunks of a streaming response; a disconnect (cancellation) or early exit stops the generation."""
    try:
        yield first
        if first.finish_reason is not None:
            return
        while True:
            item = await run.next()
            if item is END:
                return
            if isinstance(item, BaseException):
                return  # the response has started: end the stream (the chunks so far stand)
            yield item
            if item.finish_reason is not None:
                return
    finally:
        run.cancel()
