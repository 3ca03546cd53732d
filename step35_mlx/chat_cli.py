"""``step35-mlx chat`` (interactive, streaming) and ``step35-mlx generate`` (one prompt, for scripts)."""

from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer

HELP = """\
/help            show this help
/reset           forget the conversation (keeps the system prompt)
/system TEXT     set the system prompt (no TEXT: show it)
/save PATH       save the session (messages + KV cache) to a file
/load PATH       load a saved session
/stats           context use, tokens prefilled, speeds of the last answer
/exit            quit (also /quit, Ctrl-D)
Ctrl-C stops the current answer; the partial answer stays in the conversation."""

_CONTROL = {c: None for c in range(32) if c not in (9, 10)} | {127: None}


# Options shared by `chat` and `generate`.
MTP_OPTION = typer.Option(None, "--mtp/--no-mtp", help="Speculative decoding with the MTP heads (default: what `step35-mlx tune` chose for this model, else off).")
DRAFT_DEPTH_OPTION = typer.Option(None, "--draft-depth", help="MTP draft tokens per step (1-3; implies --mtp).")
MAX_CONTEXT_OPTION = typer.Option(None, "--max-context", help="Context limit in tokens (default: the model's, or the longest that fits this machine's memory).")
PREFILL_STEP_OPTION = typer.Option(512, "--prefill-step", help="Prompt tokens per prefill chunk; smaller bounds memory on long prompts.")
KV_BITS_OPTION = typer.Option(None, "--kv-bits", help="Store the KV cache quantized (4 or 8 bits).")


def _printable(text: str) -> str:
    """Model text made safe for a terminal (no escape or other control characters)."""
    return text.translate(_CONTROL)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(model: Optional[str], announce, *, max_context: Optional[int] = None, kv_bits: Optional[int] = None,
          mtp: Optional[bool] = None, prefill_step: int = 512) -> tuple[Any, Any, Path, dict, int]:
    """``(model, tokenizer, folder, generation_config, context limit)``, or a red line and exit 2.

    Before any weight is read, the memory plan (``step35_mlx.plan.preflight``) must fit this
    machine: for ``max_context`` when given, else for the longest context that fits (which
    becomes the limit). A model that does not fit is refused with the options that would fit.
    """
    from .hub import DEMO_DIR, ModelNotFoundError, resolve_model
    from .loader import CheckpointError, load
    from .plan import InsufficientMemoryError, preflight

    try:
        path = resolve_model(model)
    except ModelNotFoundError as e:
        _fail(str(e))
    if model is None:
        announce(f"No --model given: using the bundled demo model ({DEMO_DIR}). "
                 "Pass --model PATH|REPO to chat with Step 3.5 Flash.")
    keep_mtp = mtp is not False
    try:
        plan = preflight(path, context=max_context, kv_bits=kv_bits, mtp=keep_mtp, prefill_step=prefill_step)
    except InsufficientMemoryError as e:
        head, _, options = str(e).partition("\n")
        typer.secho(f"error: {head}", fg=typer.colors.RED, err=True)
        typer.echo(options, err=True)
        raise typer.Exit(2)
    except CheckpointError as e:
        _fail(f"cannot load {path}: {e}")
    except (FileNotFoundError, ValueError, OSError) as e:
        _fail(str(e))
    if max_context is None and plan.context < plan.config.max_position_embeddings:
        announce(f"Context limited to {plan.context:,} tokens so that the model fits this machine's memory "
                 f"(`step35-mlx plan --model {path}` shows the options).")
    try:
        m, tok = load(path, mtp=keep_mtp)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        _fail(f"cannot load {path}: {e}")
    from .generate import read_generation_config

    return m, tok, path, read_generation_config(path), plan.context


def _stats_line(st, interrupted: bool = False) -> str:
    parts = [f"{st.generation_tokens} tokens, {st.generation_tps:.1f} tok/s"]
    reused = st.prompt_tokens - st.prefill_tokens
    parts.append(f"prompt {st.prefill_tokens} new" + (f" + {reused} cached" if reused else "")
                 + f" at {st.prompt_tps:.0f} tok/s")
    if st.draft_depth:
        acc = "/".join(f"{a:.2f}" for a in st.acceptance)
        parts.append(f"MTP d={st.draft_depth}: {st.tokens_per_verify:.2f} tok/verify, accept {acc}")
    parts.append(f"context {st.context_tokens}/{st.context_limit}")
    gb = st.peak_memory_gb
    parts.append(f"peak {gb:.2f} GB" if gb >= 1 else f"peak {gb * 1000:.0f} MB")
    if interrupted:
        parts.append("interrupted")
    return " · ".join(parts)


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
        text = _printable(text)
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
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder, Hugging Face repo id, or 'demo' (default: the bundled demo model)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="Most tokens per answer (default: generation_config.json, else 8192, within the context)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Sampling temperature; 0 is greedy (default: generation_config.json, else 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default 0.95)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens; 0 = off."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Drop tokens below min_p x the top probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    show_reasoning: bool = typer.Option(True, "--show-reasoning/--hide-reasoning", help="Stream the reasoning dimmed, or collapse it to one line."),
    mtp: Optional[bool] = MTP_OPTION,
    draft_depth: Optional[int] = DRAFT_DEPTH_OPTION,
    max_context: Optional[int] = MAX_CONTEXT_OPTION,
    prefill_step: int = PREFILL_STEP_OPTION,
    kv_bits: Optional[int] = KV_BITS_OPTION,
) -> None:
    """Chat in the terminal: streaming answers, reasoning dimmed, the KV cache kept between turns.

    Example: step35-mlx chat --model ./Step-3.5-Flash-4bit --system "Be concise."
    """
    try:
        _chat(model, system, max_tokens, temperature, top_p, top_k, min_p, seed, show_reasoning, mtp, draft_depth,
              max_context, kv_bits, prefill_step)
    except KeyboardInterrupt:  # Ctrl-C while loading or at a prompt outside a turn
        raise typer.Exit(130)


def _chat(model, system, max_tokens, temperature, top_p, top_k, min_p, seed, show_reasoning, mtp, draft_depth,
          max_context, kv_bits, prefill_step) -> None:
    from rich.console import Console

    from .session import ChatSession

    console = Console(highlight=False, soft_wrap=True)
    m, tok, path, gen_config, max_context = _load(model, lambda msg: console.print(msg, style="yellow", markup=False),
                                                  max_context=max_context, kv_bits=kv_bits, mtp=mtp,
                                                  prefill_step=prefill_step)
    try:
        session = ChatSession(m, tok, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, min_p=min_p, seed=seed, mtp=mtp, draft_depth=draft_depth,
                              max_context=max_context, generation_config=gen_config, kv_bits=kv_bits,
                              prefill_step=prefill_step)
    except ValueError as e:
        _fail(str(e))
    console.print(f"step35-mlx chat · {path} · context limit {session.context_limit} tokens", style="bold",
                  markup=False)
    console.print("Type a message. /help lists commands; Ctrl-C stops an answer; Ctrl-D exits.", style="dim")
    interrupt = _Interrupt()
    while True:
        try:
            line = console.input("[bold green]>>> [/]")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n(Ctrl-D or /exit to quit)", style="dim")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(console, session, text):
                return
            continue
        try:
            stream = session.send(text)
        except ValueError as e:
            console.print(f"error: {e}", style="red", markup=False)
            continue
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
            finally:
                stream.close()
                printer.end()
        if interrupted:
            console.print("[interrupted]", style="yellow", markup=False)
        if session.last_stats is not None:
            console.print(_stats_line(session.last_stats, interrupted), style="dim", markup=False)


def _command(console, session, text: str) -> bool:
    """Run a slash command; True means exit."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return True
    if name == "/help":
        console.print(HELP, markup=False)
    elif name == "/reset":
        session.reset()
        console.print("conversation cleared", style="dim")
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
        try:
            if name == "/save":
                p = session.save(Path(arg).expanduser())
                console.print(f"saved {len(session.messages)} messages and {session.context_tokens} cached tokens to {p}",
                              style="dim", markup=False)
            else:
                session.load(Path(arg).expanduser())
                console.print(f"loaded {len(session.messages)} messages and {session.context_tokens} cached tokens from {arg}",
                              style="dim", markup=False)
        except (OSError, ValueError) as e:
            console.print(f"error: {e}", style="red", markup=False)
    elif name == "/stats":
        turns = sum(m.get("role") == "assistant" for m in session.messages)
        mem = sum(c.nbytes for c in session.cache) / 1e6
        console.print(f"answers: {turns} · context {session.context_tokens}/{session.context_limit} tokens · "
                      f"KV cache {mem:.1f} MB · {session.prefilled_tokens} tokens prefilled in this session",
                      style="dim", markup=False)
        if session.last_stats is not None:
            console.print("last answer: " + _stats_line(session.last_stats), style="dim", markup=False)
    else:
        console.print(f"unknown command {name}; /help lists them", style="red", markup=False)
    return False


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt, or '-' to read it from stdin."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder, Hugging Face repo id, or 'demo' (default)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", help="Most tokens to generate (default: generation_config.json, else 8192, within the context)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Sampling temperature; 0 is greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    min_p: Optional[float] = typer.Option(None, "--min-p"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop at this text (repeatable)."),
    tools: Optional[Path] = typer.Option(None, "--tools", help="JSON file with a list of tool schemas (OpenAI style)."),
    raw: bool = typer.Option(False, "--raw", help="Use the prompt as is, without the chat template."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: text, reasoning, tool_calls, finish_reason, stats."),
    show_reasoning: bool = typer.Option(False, "--show-reasoning/--hide-reasoning", help="Also stream the reasoning (to stderr)."),
    mtp: Optional[bool] = MTP_OPTION,
    draft_depth: Optional[int] = DRAFT_DEPTH_OPTION,
    max_context: Optional[int] = MAX_CONTEXT_OPTION,
    prefill_step: int = PREFILL_STEP_OPTION,
    kv_bits: Optional[int] = KV_BITS_OPTION,
) -> None:
    """Generate one answer for scripts: the answer on stdout (or --json), stats on stderr.

    Example: echo "What is a tuple?" | step35-mlx generate --prompt - --json
    """
    from .generate import stream_generate

    if prompt == "-":
        prompt = sys.stdin.read().rstrip("\n")  # the newline that `echo` adds is not part of the prompt
    if not prompt.strip():
        _fail("the prompt is empty")
    tool_list = None
    if tools is not None:
        try:
            tool_list = json.loads(tools.read_text())
        except (OSError, json.JSONDecodeError) as e:
            _fail(f"cannot read tools from {tools}: {e}")
        if isinstance(tool_list, dict):
            tool_list = [tool_list]
        if not isinstance(tool_list, list):
            _fail(f"{tools} must hold a JSON list of tool schemas")
    m, tok, _, gen_config, max_context = _load(model, lambda msg: typer.secho(msg, fg=typer.colors.YELLOW, err=True),
                                               max_context=max_context, kv_bits=kv_bits, mtp=mtp,
                                               prefill_step=prefill_step)
    if raw:
        request: Any = prompt
    else:
        request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        stream = stream_generate(m, tok, request, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                 stop=stop or None, tools=tool_list, mtp=mtp, draft_depth=draft_depth,
                                 max_context=max_context, generation_config=gen_config, kv_bits=kv_bits,
                                 prefill_step=prefill_step)
    except ValueError as e:
        _fail(str(e))
    text, reasoning, calls = [], [], []
    last = None
    for chunk in stream:
        last = chunk
        text.append(chunk.content)
        reasoning.append(chunk.reasoning)
        calls += chunk.tool_calls
        if not json_out:
            if show_reasoning and chunk.reasoning:
                typer.secho(_printable(chunk.reasoning), dim=True, err=True, nl=False)
                if not chunk.reasoning.endswith("\n") and (chunk.content or chunk.finish_reason):
                    typer.echo("", err=True)
            if chunk.content:
                typer.echo(chunk.content, nl=False)
            for c in chunk.tool_calls:
                typer.echo(json.dumps({"tool_call": c.to_dict()["function"]}, ensure_ascii=False))
            sys.stdout.flush()
    if json_out:
        typer.echo(json.dumps({
            "text": "".join(text), "reasoning": "".join(reasoning),
            "tool_calls": [c.to_dict() for c in calls],
            "finish_reason": last.finish_reason if last else None,
            "stats": last.stats.to_dict() if last else {},
        }, ensure_ascii=False))
    else:
        if "".join(text) and not "".join(text).endswith("\n"):
            typer.echo("")
        if last is not None:
            typer.secho(_stats_line(last.stats), dim=True, err=True)
