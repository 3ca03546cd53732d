"""``step35-mlx tune``: measure plain decoding against MTP depths on this machine and keep the fastest."""

from __future__ import annotations

from typing import Optional

import typer

from .common import MODEL_OPTION, fail
from .loading import load_for_cli


def tune(
    model: Optional[str] = MODEL_OPTION,
    tokens: int = typer.Option(128, "--tokens", "-n", min=8, help="Tokens to decode per measurement."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Interleaved repeats; the median counts."),
    save: bool = typer.Option(True, "--save/--no-save", help="Store the winner as this model's default."),
) -> None:
    """Measure plain decoding against MTP draft depths 1-3 on this machine and keep the fastest.

    On the CPU device with two or more cores, plain decoding is first measured on one and on two
    CPU streams and the faster count is used for the rest. Greedy outputs of every mode are checked
    to be identical. The winners are stored in ~/.cache/step35-mlx/tune.json for this model and
    device; `generate`, `chat`, `serve` and `bench` use them whenever --mtp/--no-mtp or --streams
    is not given.

    Example: step35-mlx tune --model ~/models/step35-q4
    """
    from rich.console import Console
    from rich.table import Table

    import mlx.core as mx

    from ..streams import usable_cores, use_two_streams
    from ..tune import TUNE_PROMPT, best, measure, measure_streams
    from ..tuned import TUNE_FILE, save_choice

    console = Console(stderr=True)
    loaded = load_for_cli(model, lambda msg: console.print(msg, style="yellow", markup=False))
    m, tok = loaded.model, loaded.tokenizer
    if not m.num_mtp:
        fail("this checkpoint has no MTP modules; plain decoding is the only mode")
    prompt = tok.encode(TUNE_PROMPT, add_special_tokens=False)
    streams = None
    if mx.default_device() == mx.cpu and usable_cores() >= 2:
        with console.status(f"measuring plain decoding on 1 and 2 CPU streams ({repeats} x {tokens} tokens each)"):
            by_streams = measure_streams(m, prompt, tokens, repeats=max(2, repeats))
        streams = by_streams.winner
        typer.echo(f"plain decoding: {by_streams.one:.1f} tok/s on 1 CPU stream, {by_streams.two:.1f} on 2 "
                   f"({by_streams.two / by_streams.one:.2f}x): using {streams}")
        use_two_streams(m, streams == 2)
    with console.status(f"measuring plain and MTP depths 1-{min(3, m.num_mtp)} ({repeats} x {tokens} tokens each)"):
        results = measure(m, prompt, tokens, repeats=repeats)
    table = Table(title=f"decode on {m.config.model_type} @ {loaded.path}")
    for col in ("mode", "tok/s", "x plain", "tok/verify", "acceptance", "MB read/token"):
        table.add_column(col, justify="right")
    base = results[0]
    for r in results:
        table.add_row(r.mode, f"{r.tokens_per_s:.1f}", f"{r.tokens_per_s / base.tokens_per_s:.2f}",
                      f"{r.tokens_per_verify:.2f}", " ".join(f"{a:.2f}" for a in r.acceptance) or "-",
                      f"{r.bytes_per_token / 1e6:.2f}")
    Console().print(table)
    winner = best(results)
    if save:
        save_choice(loaded.path, winner, streams=streams)
        on = f", {streams} CPU stream(s)" if streams else ""
        typer.echo(f"default for this model is now: {winner.mode}{on} (stored in {TUNE_FILE})")
    else:
        typer.echo(f"fastest here: {winner.mode} (not stored)")
