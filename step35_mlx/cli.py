"""The ``step35-mlx`` command line."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(
    name="step35-mlx",
    help="Run StepFun's Step 3.5 Flash with MLX: convert, chat, generate, serve.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"step35-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Run StepFun's Step 3.5 Flash with MLX."""


@app.command()
def info(model: str = typer.Argument(..., help="Checkpoint folder (Hugging Face or converted MLX).")) -> None:
    """Show a checkpoint's architecture summary without loading its weights.

    Example: step35-mlx info ./Step-3.5-Flash-4bit
    """
    from pathlib import Path

    from .mlx_lm_format import read_folder

    try:
        folder = read_folder(Path(model))
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    cfg = folder.config
    n_full = sum(t == "full_attention" for t in cfg.layer_types[: cfg.num_hidden_layers])
    typer.echo(
        f"{cfg.model_type}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
        f"({n_full} full / {cfg.num_hidden_layers - n_full} sliding, window {cfg.sliding_window}), "
        f"{len(cfg.moe_layers)} MoE layers ({cfg.moe_num_experts} experts, top-{cfg.moe_top_k}), "
        f"{cfg.num_nextn_predict_layers} MTP layers, vocab {cfg.vocab_size}"
    )
    if folder.mlx_lm:
        typer.echo(folder.mlx_lm.notice())


def _register_convert_commands() -> None:
    from .convert.commands import register

    register(app)


_register_convert_commands()


from . import chat_cli  # noqa: E402  (commands: chat, generate)

app.command("chat")(chat_cli.chat)
app.command("generate")(chat_cli.generate)

from . import plan_cli  # noqa: E402  (command: plan)

app.command("plan", help=plan_cli.PLAN_HELP)(plan_cli.plan)

from . import serve_cli  # noqa: E402  (command: serve)

app.command("serve")(serve_cli.serve)

from . import graft_cli  # noqa: E402  (command: graft-mtp)

app.command("graft-mtp", help=graft_cli.GRAFT_HELP)(graft_cli.graft_mtp)


@app.command()
def tune(
    model: str = typer.Option("demo", "--model", "-m", help="Model folder, Hugging Face repo id, or 'demo'."),
    tokens: int = typer.Option(128, "--tokens", "-n", min=8, help="Tokens to decode per measurement."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Interleaved repeats; the median counts."),
    save: bool = typer.Option(True, "--save/--no-save", help="Store the winner as this model's default."),
) -> None:
    """Measure plain decoding against MTP draft depths 1-3 on this machine and keep the fastest.

    Greedy outputs of every mode are checked to be identical. The winner is stored in
    ~/.cache/step35-mlx/tune.json for this model and device; `generate` and `chat` use it
    whenever --mtp/--no-mtp is not given.

    Example: step35-mlx tune --model ~/models/step35-q4
    """
    from rich.console import Console
    from rich.table import Table

    from .hub import ModelNotFoundError, resolve_model
    from .loader import CheckpointError, load
    from .tune import TUNE_FILE, TUNE_PROMPT, best, measure, save_choice

    console = Console(stderr=True)
    try:
        path = resolve_model(model)
        m, tok = load(path)
    except (ModelNotFoundError, CheckpointError, FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if not m.num_mtp:
        typer.secho("error: this checkpoint has no MTP modules; plain decoding is the only mode",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    prompt = tok.encode(TUNE_PROMPT, add_special_tokens=False)
    with console.status(f"measuring plain and MTP depths 1-{min(3, m.num_mtp)} ({repeats} x {tokens} tokens each)"):
        results = measure(m, prompt, tokens, repeats=repeats)
    table = Table(title=f"decode on {m.config.model_type} @ {path}")
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
        save_choice(path, winner)
        typer.echo(f"default for this model is now: {winner.mode} (stored in {TUNE_FILE})")
    else:
        typer.echo(f"fastest here: {winner.mode} (not stored)")
