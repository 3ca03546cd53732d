"""The ``step35-mlx`` Typer app: one module per command, registered here."""

from __future__ import annotations

import typer

from .. import __version__
from .bench import bench
from .chat import chat
from .convert import CONVERT_HELP, convert_cmd, quant_eval_cmd, verify_cmd
from .generate import generate
from .graft import GRAFT_HELP, graft_mtp
from .info import info
from .plan import PLAN_HELP, plan
from .serve import serve
from .split_model import split_model
from .tune import tune

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


app.command("chat")(chat)
app.command("generate")(generate)
app.command("serve")(serve)
app.command("convert", help=CONVERT_HELP)(convert_cmd)
app.command("verify")(verify_cmd)
app.command("quant-eval")(quant_eval_cmd)
app.command("graft-mtp", help=GRAFT_HELP)(graft_mtp)
app.command("plan", help=PLAN_HELP)(plan)
app.command("tune")(tune)
app.command("info")(info)
app.command("bench")(bench)
app.command("split-model")(split_model)
