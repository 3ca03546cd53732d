"""``step35-mlx split-model``: one folder per rank holding only what that rank loads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import fail


def split_model(
    source: Path = typer.Argument(..., help="A converted (or original) checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write rank0/, rank1/, ... into."),
    parallel: str = typer.Option(..., "--parallel", help="tensor, expert or pipeline (as you will run it)."),
    ranks: int = typer.Option(..., "--ranks", "-n", min=2, help="Number of Macs (ranks)."),
    split: Optional[str] = typer.Option(None, "--split", help="--parallel pipeline: trunk layers per rank, e.g. 30,15."),
) -> None:
    """Cut a checkpoint into per-rank copies for `--parallel`, so each Mac stores only its share.

    Copy rankK/ to Mac K under one path and pass that path as --model on every Mac:
    step35-mlx split-model ~/models/step35-q4 --out parts --parallel pipeline --ranks 2 --split 30,15
    """
    from ..config import ModelConfig
    from ..distributed.pipeline import parse_split
    from ..distributed.subset import write_rank_subset

    if not source.is_dir():
        fail(f"{source} is not a folder")
    if out.exists() and any(out.iterdir()):
        fail(f"{out} is not empty; choose a new folder")
    try:
        config = ModelConfig.from_file(source)
        counts = parse_split(split, config.num_hidden_layers, ranks) if split else None
        if split and parallel != "pipeline":
            raise ValueError("--split applies to --parallel pipeline only")
        for r in range(ranks):
            res = write_rank_subset(source, out / f"rank{r}", parallel, ranks, r, split=counts)
            size = f"{res.nbytes / 1e9:.2f} GB" if res.nbytes >= 1e9 else f"{res.nbytes / 1e6:.1f} MB"
            typer.echo(f"rank {r}: {res.tensors} tensors, {size} -> {res.path}")
    except (ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"then, e.g.: rsync -a {out}/rank1/ mac2:~/models/step35-part/   (rank0/ to mac1 at the same path)")
