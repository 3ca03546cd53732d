"""``step35-mlx chat``: interactive, streaming, the KV cache kept between turns."""

from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from .common import (CACHE_DIR_OPTION, CACHE_DISK_OPTION, DRAFT_DEPTH_OPTION, KV_BITS_OPTION, MAX_CONTEXT_OPTION,
                     MAX_TOKENS_OPTION, MIN_P_OPTION, MODEL_OPTION, MTP_OPTION, PREFILL_STEP_OPTION, SEED_OPTION,
                     SYSTEM_OPTION, TEMPERATURE_OPTION, TOP_K_OPTION, TOP_P_OPTION, STREAMS_OPTION, VISION_OPTION, cache_budgets,
                     fail, open_prefix_cache, printable, stats_line)
from ..text import invalid_text_reason
from .loading import load_for_cli
from .parallel import PARALLEL_OPTION, SPLIT_OPTION

CHAT_CACHE_RAM = 10**9  # RAM tier in front of chat's --cache-disk (entries wait there until written)

HELP = """\
/help            show this help
/reset           forget the conversation (keeps the system prompt)
/system TEXT     set the system prompt (no TEXT: show it)
/save PATH       save the session (messages + KV cache) to a file
/load PATH       load a saved session
/stats           context use, tokens prefilled, speeds of the last answer
/image PATH      attach a picture to the next message (Step 3.7 models; repeat for several)
/exit            quit (also /quit, Ctrl-D)
Ctrl-C stops the current answer; the partial answer stays in the conversation."""


class _Interrupt:
    """Ctrl-C while an answer streams: the first press asks the loop to stop after the current token;
    a second press (e.g. during a long prefill) interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def armed(self) -> Iterator["_Interrupt"]:
        self.requested = False
        try:
            previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            previous = None
        try:
            yield self
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


class _Printer:
    """Streams one reply: reasoning dimmed (or a one-line counter), then the answer."""

    def __init__(self, console, show_reasoning: bool) -> None:
        from rich.status import Status

        self.console = console
        self.show = show_reasoning
        self.reasoning_tokens = 0
        self.reasoning_open = False
        self.answer_started = False
        self.at_line_start = True
        self.status: Status | None = None
        self._last_update = 0.0

    def _write(self, text: str, style: str | None = None) -> None:
        text = printable(text)
        if not text:
            return
        self.console.print(text, style=style, end="", markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()
        self.at_line_start = text.endswith("\n")

    def _close_reasoning(self) -> None:
        if not self.reasoning_open:
            return
        self.reasoning_open = False
        if self.show:
            if not self.at_line_start:
                self._write("\n")
            self._write("\n")
        else:
            if self.status is not None:
                self.status.stop()
                self.status = None
            self._write(f"[thought for {self.reasoning_tokens} tokens]\n", style="dim")

    def _open_reasoning(self) -> None:
        if self.reasoning_open:
            return
        self.reasoning_open = True
        if not self.show:
            self.status = self.console.status("thinking…", spinner="dots")
            self.status.start()

    def chunk(self, c) -> None:
        if not self.answer_started:
            answer_now = bool(c.content or c.tool_calls)
            if c.reasoning or not answer_now:
                self.reasoning_tokens += len(c.token_ids)
                self._open_reasoning()
                if self.show:
                    self._write(c.reasoning, style="dim")
                elif self.status is not None and time.monotonic() - self._last_update > 0.1:
                    self.status.update(f"thinking… {self.reasoning_tokens} tokens")
                    self._last_update = time.monotonic()
            if not answer_now:
                return
            self._close_reasoning()
            self.answer_started = True
        self._write(c.content)
        for call in c.tool_calls:
            if not self.at_line_start:
                self._write("\n")
            self._write(f"[tool call] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})\n", style="cyan")

    def end(self) -> None:
        self._close_reasoning()
        if not self.at_line_start:
            self._write("\n")


def chat(
    model: Optional[str] = MODEL_OPTION,
    system: Optional[str] = SYSTEM_OPTION,
    max_tokens: Optional[int] = MAX_TOKENS_OPTION,
    temperature: Optional[float] = TEMPERATURE_OPTION,
    top_p: Optional[float] = TOP_P_OPTION,
    top_k: Optional[int] = TOP_K_OPTION,
    min_p: Optional[float] = MIN_P_OPTION,
    seed: Optional[int] = SEED_OPTION,
    show_reasoning: bool = typer.Option(True, "--show-reasoning/--hide-reasoning", help="Stream the reasoning dimmed, or collapse it to one line."),
    mtp: Optional[bool] = MTP_OPTION,
    draft_depth: Optional[int] = DRAFT_DEPTH_OPTION,
    max_context: Optional[int] = MAX_CONTEXT_OPTION,
    prefill_step: int = PREFILL_STEP_OPTION,
    kv_bits: Optional[int] = KV_BITS_OPTION,
    cache_disk: str = CACHE_DISK_OPTION,
    cache_dir: Path = CACHE_DIR_OPTION,
    parallel: Optional[str] = PARALLEL_OPTION,
    split: Optional[str] = SPLIT_OPTION,
    vision: bool = VISION_OPTION,
    streams: Optional[int] = STREAMS_OPTION,
) -> None:
    """Chat in the terminal: streaming answers, reasoning dimmed, the KV cache kept between turns.

    With --cache-disk the KV state of every prompt and answer is also kept on SSD: a later chat with the same system prompt (or the same opening turns) starts from it.

    Example: step35-mlx chat --model ./Step-3.5-Flash-4bit --system "Be concise."
    """
    from rich.console import Console

    from ..session import ChatSession

    console = Console(highlight=False, soft_wrap=True)

    def warn(msg: str) -> None:
        console.print(msg, style="yellow", markup=False)

    _, disk = cache_budgets("0", cache_disk, cache_dir)
    if parallel is not None and disk:
        fail("--cache-disk does not work with --parallel yet (each rank holds part of the cache)")
    ram = CHAT_CACHE_RAM if disk else 0
    try:
        loaded = load_for_cli(model, warn, max_context=max_context, kv_bits=kv_bits, mtp=mtp,
                              prefill_step=prefill_step, parallel=parallel, split=split, cache_ram=ram,
                              vision=vision, streams=streams)
        prefix_cache = open_prefix_cache(loaded.model, ram, disk, cache_dir, warn, kv_bits)
        try:
            session = ChatSession(loaded.model, loaded.tokenizer, system=system, max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, mtp=mtp,
                                  draft_depth=draft_depth, max_context=loaded.context_limit,
                                  generation_config=loaded.generation_config, kv_bits=kv_bits,
                                  prefill_step=prefill_step, prefix_cache=prefix_cache)
        except ValueError as e:
            fail(str(e))
        if parallel is not None:
            from .parallel import chat_across_ranks

            return chat_across_ranks(session, loaded.model.token_group,
                                     lambda s: _converse(console, s, show_reasoning))
        console.print(f"step35-mlx chat · {loaded.path} · context limit {session.context_limit} tokens",
                      style="bold", markup=False)
        console.print("Type a message. /help lists commands; Ctrl-C stops an answer; Ctrl-D exits.", style="dim")
        _converse(console, session, show_reasoning)
    except KeyboardInterrupt:  # Ctrl-C while loading or at a prompt outside a turn
        raise typer.Exit(130)


def _read_line(console) -> str:
    """One input line; bytes that are not UTF-8 arrive as lone surrogates (checked by the caller)."""
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure") and getattr(stdin, "errors", None) == "strict":
        stdin.reconfigure(errors="surrogateescape")
    return console.input("[bold green]>>> [/]")


def _converse(console, session, show_reasoning: bool) -> None:
    """The read-answer loop: every user mistake prints one red line and the conversation goes on."""
    interrupt = _Interrupt()
    images: list[Path] = []  # /image attachments for the next message
    while True:
        try:
            line = _read_line(console)
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n(Ctrl-D or /exit to quit)", style="dim")
            continue
        text = line.strip()
        if not text:
            continue
        reason = invalid_text_reason(text)
        if reason is not None:
            console.print(f"error: that line was not sent: {reason}", style="red", markup=False)
            continue
        if text.startswith("/"):
            if _command(console, session, text, images):
                return
            continue
        try:
            stream = session.send(text, images=[str(p) for p in images])
        except ValueError as e:
            console.print(f"error: {e}", style="red", markup=False)
            continue
        images.clear()
        printer = _Printer(console, show_reasoning)
        interrupted = False
        with interrupt.armed():
            try:
                for chunk in stream:
                    printer.chunk(chunk)
                    if interrupt.requested:
                        interrupted = True
                        break
            except KeyboardInterrupt:
                interrupted = True
            except RuntimeError as e:  # MLX could not run an operation (e.g. a kernel its backend lacks)
                printer.end()
                console.print(f"error: the MLX backend could not run this: {e}", style="red", markup=False)
            finally:
                stream.close()
                printer.end()
        if interrupted:
            console.print("[interrupted]", style="yellow", markup=False)
        if session.last_stats is not None:
            console.print(stats_line(session.last_stats, interrupted), style="dim", markup=False)


def _command(console, session, text: str, images: list[Path]) -> bool:
    """Run a slash command; True means exit. ``/image`` adds to ``images`` (the next message's pictures)."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return True
    if name == "/help":
        console.print(HELP, markup=False)
    elif name == "/reset":
        session.reset()
        images.clear()
        console.print("conversation cleared", style="dim")
    elif name == "/image":
        _attach(console, session, arg, images)
    elif name == "/system":
        if arg:
            session.set_system(arg)
            console.print("system prompt set (the next answer re-reads the conversation)", style="dim")
        else:
            console.print(f"system prompt: {session.system!r}", style="dim", markup=False)
    elif name in ("/save", "/load"):
        if not arg:
            console.print(f"usage: {name} PATH", style="red")
            return False
        target = Path(arg).expanduser()
        try:
            if name == "/save":
                p = session.save(target)
                console.print(f"saved {len(session.messages)} messages and {session.context_tokens} cached tokens to {p}",
                              style="dim", markup=False)
            else:
                session.load(target)
                console.print(f"loaded {len(session.messages)} messages and {session.context_tokens} cached tokens from {arg}",
                              style="dim", markup=False)
        except OSError as e:
            message = str(e) if e.strerror is None else (
                f"cannot {name[1:]} the session {'to' if name == '/save' else 'from'} {target}: {e.strerror}")
            console.print(f"error: {message}", style="red", markup=False)
        except ValueError as e:
            console.print(f"error: {e}", style="red", markup=False)
    elif name == "/stats":
        turns = sum(m.get("role") == "assistant" for m in session.messages)
        mem = sum(c.nbytes for c in session.cache) / 1e6
        console.print(f"answers: {turns} · context {session.context_tokens}/{session.context_limit} tokens · "
                      f"KV cache {mem:.1f} MB · {session.prefilled_tokens} tokens prefilled in this session",
                      style="dim", markup=False)
        if session.last_stats is not None:
            console.print("last answer: " + stats_line(session.last_stats), style="dim", markup=False)
    else:
        console.print(f"unknown command {name}; /help lists them", style="red", markup=False)
    return False


def _attach(console, session, arg: str, images: list[Path]) -> None:
    from ..vision.files import NO_VISION, check_image_file, has_vision

    if not arg:
        console.print("usage: /image PATH", style="red")
        return
    if not has_vision(session.model):
        console.print(f"error: {NO_VISION}", style="red", markup=False)
        return
    try:
        images.append(check_image_file(arg))
    except ValueError as e:
        console.print(f"error: {e}", style="red", markup=False)
        return
    console.print(f"attached {images[-1]} ({len(images)} picture(s) for the next message)", style="dim",
                  markup=False)
