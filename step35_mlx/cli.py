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

    from .config import ModelConfig

    try:
        cfg = ModelConfig.from_file(Path(model))
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    n_full = sum(t == "full_attention" for t in cfg.layer_types[: cfg.num_hidden_layers])
    typer.echo(
        f"{cfg.model_type}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
        f"({n_full} full / {cfg.num_hidden_layers - n_full} sliding, window {cfg.sliding_window}), "
        f"{len(cfg.moe_layers)} MoE layers ({cfg.moe_num_experts} experts, top-{cfg.moe_top_k}), "
        f"{cfg.num_nextn_predict_layers} MTP layers, vocab {cfg.vocab_size}"
    )


def _register_convert_commands() -> None:
    from .convert.commands import register

    register(app)


_register_convert_commands()


from . import chat_cli  # noqa: E402  (commands: chat, generate)

app.command("chat")(chat_cli.chat)
app.command("generate")(chat_cli.generate)
