"""Serving across ranks: rank 0 takes the requests, every other rank runs the same generations.

Rank 0's engine runs one generation at a time on its worker thread; before each one it
broadcasts the job (the call and its arguments, as JSON) from that thread, so the ranks see
jobs in the same order. During a generation, rank 0 also decides after every chunk whether
to stop (the reply finished, or its client went away) and the others follow, so a
disconnect never leaves ranks in different places. ``follow`` is the other ranks' loop.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import mlx.core as mx

from .runtime import share_text

EXIT = "exit"


class JobChannel:
    """Jobs and stop decisions from rank 0 to the other ranks of ``group``."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group

    @property
    def leader(self) -> bool:
        return self.group.rank() == 0

    def share_job(self, job: dict | None = None) -> dict:
        """Rank 0 passes ``job``; every rank returns it."""
        return json.loads(share_text(json.dumps(job) if self.leader else "", self.group))

    def share_stop(self, stop: bool) -> bool:
        """Rank 0's stop decision, on every rank."""
        mine = mx.array([int(stop) if self.leader else 0], dtype=mx.int32)
        return bool(mx.distributed.all_sum(mine, group=self.group).item())


def run_job(engine: Any, job: dict, should_stop: Callable[[], bool] | None = None) -> Iterator:
    """The generation ``job`` names, on ``engine`` (``server.Engine``): the same call on every rank.

    ``should_stop``: the prefill's stop check (single machine only: ranks must run the same chunks).
    """
    if job["kind"] == "chat":
        return engine.session.generate_for(job["messages"], job["tools"], should_stop=should_stop, **job["settings"])
    return engine.start_completion(job["prompt"], job["settings"], should_stop)


def consume(chunks: Iterator, channel: JobChannel, post: Callable[[Any], None], cancelled: Callable[[], bool]) -> None:
    """Iterate a generation until it finishes or rank 0 says stop; ``post`` gets each chunk (rank 0 sends it out)."""
    try:
        for chunk in chunks:
            post(chunk)
            if channel.share_stop(chunk.finish_reason is not None or cancelled()):
                break
    finally:
        chunks.close()


def follow(engine: Any, channel: JobChannel) -> None:
    """The loop of ranks other than 0: run every job rank 0 announces until it says exit."""
    while True:
        job = channel.share_job()
        if job["kind"] == EXIT:
            return
        try:
            chunks = run_job(engine, job)
        except ValueError:
            continue  # rank 0 raised the same error for its client, before any collective
        try:
            consume(chunks, channel, lambda c: None, lambda: False)
        except ValueError:
            continue


def leader_stream(chunks: Iterator, channel: JobChannel) -> Iterator:
    """Rank 0's side of ``consume`` for a caller that simply stops iterating (Ctrl-C in ``chat``):
    after each chunk the followers learn whether the reply finished or the caller stopped."""
    try:
        for chunk in chunks:
            try:
                yield chunk
            except GeneratorExit:
                channel.share_stop(True)
                raise
            if channel.share_stop(chunk.finish_reason is not None):
                return
    finally:
        chunks.close()


class LeaderSession:
    """A ``ChatSession`` on rank 0 whose every change is repeated by the other ranks (``follow_chat``)."""

    def __init__(self, session: Any, channel: JobChannel):
        self._session, self._channel = session, channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def send(self, text: str, images: list | None = None) -> Iterator:
        if images:
            raise ValueError("images are not available with --parallel yet; run without it to attach them")
        self._channel.share_job({"kind": "send", "text": text})
        return leader_stream(self._session.send(text), self._channel)

    def reset(self) -> None:
        self._channel.share_job({"kind": "reset"})
        self._session.reset()

    def set_system(self, text: str) -> None:
        self._channel.share_job({"kind": "system", "text": text})
        self._session.set_system(text)

    def save(self, path: Any) -> Any:
        raise ValueError("/save and /load are not available with --parallel (each rank holds part of the cache)")

    load = save

    def close(self) -> None:
        self._channel.share_job({"kind": EXIT})


def follow_chat(session: Any, channel: JobChannel) -> None:
    """The other ranks' side of ``chat --parallel``: repeat rank 0's session calls until it exits."""
    while True:
        job = channel.share_job()
        if job["kind"] == EXIT:
            return
        if job["kind"] == "reset":
            session.reset()
        elif job["kind"] == "system":
            session.set_system(job["text"])
        else:
            try:
                chunks = session.send(job["text"])
            except ValueError:
                continue  # rank 0 refused the same message before generating
            consume(chunks, channel, lambda c: None, lambda: False)
