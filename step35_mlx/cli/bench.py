"""``step35-mlx bench``: prompt-processing and generation tokens/s at several context depths."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Optional

import typer

from .common import MODEL_OPTION, STREAMS_OPTION, fail
from .loading import load_for_cli


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d.strip().lower().replace("k", "")) * (1024 if d.strip().lower().endswith("k") else 1)
                  for d in text.split(",") if d.strip()]
    except ValueError:
        fail(f"--depth takes comma-separated token counts such as 0,4096,32768, got {text!r}")
    if not depths or any(d < 0 for d in depths):
        fail(f"--depth takes non-negative token counts such as 0,4096,32768, got {text!r}")
    return depths


def bench(
    model: Optional[str] = MODEL_OPTION,
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", "-p", min=1, help="Prompt tokens timed to the first token (pp)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", "-n", min=1, help="Tokens generated after the prompt (tg)."),
    depth: str = typer.Option("0", "--depth", "-d", help="Context tokens already in the cache, comma-separated (e.g. 0,4096,32k)."),
    mtp: int = typer.Option(0, "--mtp", min=0, max=3, help="Also decode with this many MTP drafts per step (0: plain only)."),
    repetitions: int = typer.Option(3, "--repetitions", "-r", min=1, help="Repetitions per depth; medians are reported."),
    prefill_step: int = typer.Option(512, "--prefill-step", min=1, help="Prompt tokens per prefill chunk."),
    vs_mlx_lm: bool = typer.Option(False, "--vs-mlx-lm", help="Also run mlx-lm's own model on the same weights and print ratios."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    streams: Optional[int] = STREAMS_OPTION,
) -> None:
    """Measure prompt processing and generation speed (tokens/s) and peak memory at several context depths.

    One table to paste into an issue: the machine (chip, memory, MLX version and device), pp and tg tokens/s per depth (medians and ranges), peak memory, MTP acceptance when --mtp is on, the compute floor, and with --vs-mlx-lm the same measurement of mlx-lm's model on the same folder (loaded beside ours, repetitions interleaved; on the CPU both run float32) and the ratios.

    Example: step35-mlx bench --model ~/models/step35-q4 -p 512 -n 128 --depth 0,4096,32768

    Example: step35-mlx bench --model demo --mtp 2 --json
    """
    from mlx.utils import tree_flatten
    from rich.console import Console

    from ..bench import BenchSettings, machine_info, measure, mlx_lm_engine, ours_engine, ratios, report, table
    from ..floor import floor_tokens_per_s

    depths = _depths(depth)
    console = Console(stderr=True)
    loaded = load_for_cli(model, lambda msg: console.print(msg, style="yellow", markup=False), mtp=bool(mtp),
                          streams=streams)
    m = loaded.model
    if mtp and mtp > m.num_mtp:
        fail(f"--mtp {mtp}: this checkpoint has {m.num_mtp} MTP modules")
    need = max(depths) + prompt_tokens + gen_tokens + mtp
    if need > loaded.context_limit:
        fail(f"depth {max(depths)} + {prompt_tokens} prompt + {gen_tokens} generated tokens = {need} exceeds "
             f"the context limit of {loaded.context_limit} tokens")
    settings = BenchSettings(prompt_tokens, gen_tokens, depths, 0, repetitions, prefill_step, streams=loaded.streams)
    cfg = m.config
    desc = (f"{loaded.path} ({cfg.model_type}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
            f"vocab {cfg.vocab_size}, {(cfg.raw.get('quantization') or {}).get('bits', 'float')} bits)")
    if vs_mlx_lm:
        weights = sum(v.nbytes for _, v in tree_flatten(m.parameters()))
        ram = machine_info().memory_gb * 1e9
        if ram and 2 * weights > 0.8 * ram:
            fail(f"--vs-mlx-lm loads mlx-lm's copy beside ours: 2 x {weights / 1e9:.1f} GB of weights do not fit "
                 f"in {ram / 1e9:.0f} GB; run `bench` and mlx-lm's own benchmark separately")
    engines = [ours_engine(m, settings)]
    if mtp:
        engines.append(ours_engine(m, replace(settings, mtp=mtp)))
    with console.status("measuring") as status:
        def progress(msg: str) -> None:
            status.update(msg)

        progress("compute floor")
        floor_tps = floor_tokens_per_s(m, gen_tokens)
        if vs_mlx_lm:
            progress("loading mlx-lm's model")
            try:
                engines.append(mlx_lm_engine(loaded.path, settings))
            except (ValueError, KeyError, OSError, ImportError) as e:
                fail(f"mlx-lm cannot run {loaded.path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        rows = measure(engines, settings, progress)
    theirs = [r for r in rows if r.engine == "mlx-lm"]
    ratio_rows = ratios([r for r in rows if r.engine == "ours"], theirs)
    machine = machine_info()
    if as_json:
        typer.echo(json.dumps(report(machine, desc, settings, rows, ratio_rows, floor_tps), indent=1))
    else:
        typer.echo(table(machine, desc, settings, rows, ratio_rows, floor_tps))
