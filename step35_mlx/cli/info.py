"""``step35-mlx info``: what a checkpoint folder holds, from its config.json alone."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import fail


def info(model: str = typer.Argument(..., help="Checkpoint folder (Hugging Face or converted MLX), or 'demo'.")) -> None:
    """Show a checkpoint's architecture summary without loading its weights.

    Example: step35-mlx info ./Step-3.5-Flash-4bit
    """
    from ..hub import DEMO_DIR, DEMO_NAME
    from ..mlx_lm_format import read_folder

    path = DEMO_DIR if model == DEMO_NAME else Path(model).expanduser()
    try:
        folder = read_folder(path)
    except (OSError, ValueError) as e:
        fail(str(e))
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
