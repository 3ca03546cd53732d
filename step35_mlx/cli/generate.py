"""``step35-mlx generate``: one answer for scripts (stdout, or one JSON object)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from .common import (DRAFT_DEPTH_OPTION, KV_BITS_OPTION, MAX_CONTEXT_OPTION, MAX_TOKENS_OPTION, MIN_P_OPTION,
                     MODEL_OPTION, MTP_OPTION, PREFILL_STEP_OPTION, SEED_OPTION, SYSTEM_OPTION, TEMPERATURE_OPTION,
                     TOP_K_OPTION, TOP_P_OPTION, STREAMS_OPTION, VISION_OPTION, fail, printable, stats_line)
from ..text import invalid_text_reason
from .loading import load_for_cli
from .parallel import PARALLEL_OPTION, SPLIT_OPTION


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt, or '-' to read it from stdin."),
    model: Optional[str] = MODEL_OPTION,
    system: Optional[str] = SYSTEM_OPTION,
    max_tokens: Optional[int] = MAX_TOKENS_OPTION,
    temperature: Optional[float] = TEMPERATURE_OPTION,
    top_p: Optional[float] = TOP_P_OPTION,
    top_k: Optional[int] = TOP_K_OPTION,
    min_p: Optional[float] = MIN_P_OPTION,
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    seed: Optional[int] = SEED_OPTION,
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
    parallel: Optional[str] = PARALLEL_OPTION,
    split: Optional[str] = SPLIT_OPTION,
    image: Optional[List[Path]] = typer.Option(None, "--image", "-i",
                                               help="A picture for the prompt (Step 3.7 models; repeatable)."),
    vision: bool = VISION_OPTION,
    streams: Optional[int] = STREAMS_OPTION,
) -> None:
    """Generate one answer for scripts: the answer on stdout (or --json), stats on stderr.

    Example: echo "What is a tuple?" | step35-mlx generate --prompt - --json
    """
    from ..generate import stream_generate

    if prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            fail(f"standard input is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})")
        prompt = prompt.rstrip("\n")  # the newline that `echo` adds is not part of the prompt
    if not prompt.strip():
        fail("the prompt is empty")
    for what, text in (("the prompt", prompt), ("--system", system or "")):
        reason = invalid_text_reason(text)
        if reason is not None:
            fail(f"{what} cannot be used: {reason}")
    tool_list = None
    if tools is not None:
        try:
            tool_list = json.loads(tools.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(f"cannot read tools from {tools}: {e}")
        if isinstance(tool_list, dict):
            tool_list = [tool_list]
        if not isinstance(tool_list, list):
            fail(f"{tools} must hold a JSON list of tool schemas")
    images = _check_images(image or [], raw)
    loaded = load_for_cli(model, lambda msg: typer.secho(msg, fg=typer.colors.YELLOW, err=True),
                          max_context=max_context, kv_bits=kv_bits, mtp=mtp, prefill_step=prefill_step, streams=streams,
                          parallel=parallel, split=split, images=bool(images), vision=vision)
    if parallel is not None:
        from ..distributed.runtime import share_text

        prompt = share_text(prompt, loaded.model.token_group)
    if raw:
        request: Any = prompt
    else:
        content: Any = prompt
        if images:
            content = [{"type": "image", "image": str(p)} for p in images] + [{"type": "text", "text": prompt}]
        request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    try:
        stream = stream_generate(loaded.model, loaded.tokenizer, request, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                 stop=stop or None, tools=tool_list, mtp=mtp, draft_depth=draft_depth,
                                 max_context=loaded.context_limit, generation_config=loaded.generation_config, kv_bits=kv_bits,
                                 prefill_step=prefill_step)
    except ValueError as e:
        fail(str(e))
    text, reasoning, raw_text, calls = [], [], [], []
    last = None
    try:
        for chunk in stream:
            last = chunk
            text.append(chunk.content)
            reasoning.append(chunk.reasoning)
            raw_text.append(chunk.text)
            calls += chunk.tool_calls
            if not json_out:
                _echo_chunk(chunk, show_reasoning)
    except ValueError as e:
        fail(str(e))
    except RuntimeError as e:  # MLX reports an operation its backend cannot run (e.g. a missing kernel)
        fail(f"the MLX backend could not run this: {e}")
    answer = "".join(text)
    if json_out:
        typer.echo(json.dumps({
            "text": answer, "reasoning": "".join(reasoning),
            "tool_calls": [c.to_dict() for c in calls],
            "finish_reason": last.finish_reason if last else None,
            "stats": last.stats.to_dict() if last else {},
        }, ensure_ascii=False))
    else:
        if answer and not answer.endswith("\n"):
            typer.echo("")
        if last is not None:
            typer.secho(stats_line(last.stats), dim=True, err=True)
    note = empty_answer_note(answer, calls, "".join(reasoning), "".join(raw_text), last,
                             show_reasoning and not json_out)
    if note:
        typer.secho(note, fg=typer.colors.YELLOW, err=True)


def _check_images(paths: List[Path], raw: bool) -> List[Path]:
    """The ``--image`` files, each checked to be a readable picture (before the model loads)."""
    from ..vision.files import check_image_file

    if paths and raw:
        fail("--image needs the chat template; it cannot be combined with --raw")
    try:
        return [check_image_file(p) for p in paths]
    except ValueError as e:
        fail(str(e))


def _echo_chunk(chunk, show_reasoning: bool) -> None:
    if show_reasoning and chunk.reasoning:
        typer.secho(printable(chunk.reasoning), dim=True, err=True, nl=False)
        if not chunk.reasoning.endswith("\n") and (chunk.content or chunk.finish_reason):
            typer.echo("", err=True)
    if chunk.content:
        typer.echo(chunk.content, nl=False)
    for c in chunk.tool_calls:
        typer.echo(json.dumps({"tool_call": c.to_dict()["function"]}, ensure_ascii=False))
    sys.stdout.flush()


def empty_answer_note(answer: str, calls: list, reasoning: str, raw: str, last: Any,
                      reasoning_shown: bool) -> str | None:
    """The stderr line for an answer left empty because generation ended inside the reasoning."""
    from ..reasoning import THINK_CLOSE

    if answer.strip() or calls or last is None or not reasoning or THINK_CLOSE in raw:
        return None
    if last.finish_reason == "length":
        why = f"the {last.stats.generation_tokens}-token budget ran out before the reasoning ended (</think>)"
    else:
        why = "the model stopped before it closed its reasoning (</think>)"
    see = "" if reasoning_shown else "--show-reasoning shows the reasoning; "
    return f"note: the answer is empty: {why}; {see}a larger -n/--max-tokens lets it finish"
