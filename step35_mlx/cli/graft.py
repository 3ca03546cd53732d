"""``step35-mlx graft-mtp``: add the original's MTP heads to an mlx-lm / mlx-community folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import fail

GRAFT_HELP = """Add the 3 MTP heads (speculative decoding) to an mlx-lm / mlx-community conversion.

Reads only the MTP tensors of the original checkpoint with HTTP range requests (its index, the headers of the shards that hold them, then the tensors: about 4.9 GB of the 400 GB), quantizes them like the folder (or --bits) and adds one shard, index and config entries. The big shards are not touched; mlx-lm still loads the folder. An interrupted run resumes.

--restore also fetches the float routers and exact norms that mlx-lm quantized or rounded (about 100 MB).

Example: step35-mlx graft-mtp ~/models/Step-3.5-Flash-4bit --dry-run
"""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _dry_run(folder: Path, repo: str, revision: Optional[str], bits: Optional[int], restore: bool) -> None:
    from ..convert.graft import config_estimate, is_grafted, is_restored, plan_graft, target_config
    from ..convert.remote import RemoteError

    config, recipe = target_config(folder, bits)
    grafted = is_grafted(folder)
    if grafted and (not restore or is_restored(folder)):
        typer.echo(f"{folder} already has its MTP heads" + (" and restored routers and norms" if restore else "")
                   + "; nothing to do")
        return
    quant = f"{recipe.default.bits}-bit g{recipe.default.group_size}" if recipe else "kept float"
    est = config_estimate(config, recipe)
    try:
        plan = plan_graft(folder, repo, revision, bits=bits, mtp=not grafted, restore=restore)
    except RemoteError as e:
        if not e.unreachable:
            raise
        typer.echo(f"cannot reach the Hub ({e}); sizes from config.json shapes instead (bf16 release):")
        typer.echo(f"  {est.tensors} MTP tensors of {config.num_nextn_predict_layers} layers: "
                   f"download {_gb(est.download_bytes)}, written {_gb(est.output_bytes)} ({quant})")
        if restore:
            typer.echo(f"  --restore: {est.restore_tensors} float routers and norms, {_gb(est.restore_bytes)} more")
        return
    typer.echo(f"graft plan for {folder} from {plan.repo}@{plan.revision}:")
    typer.echo(f"  read {len(plan.tensors)} MTP tensors of {plan.mtp_layers} layers from {len(plan.shards_read)} "
               f"of {plan.shards_total} shards ({', '.join(plan.shards_read)})")
    heads = sum(t.info.nbytes for t in plan.tensors)
    typer.echo(f"  download {_gb(heads)} (config shapes say {_gb(est.download_bytes) if plan.tensors else '-'}) "
               f"+ {_gb(plan.metadata_bytes)} index and headers (already read)")
    if plan.restore:
        typer.echo(f"  and {len(plan.restore.tensors)} float routers and norms ({_gb(plan.restore.data_bytes)}) "
                   "into step35-restore/ (--restore)")
    typer.echo(f"  write {_gb(plan.shard_bytes)} ({quant} heads); nothing written now (--dry-run)")


def graft_mtp(
    folder: Path = typer.Argument(..., help="The mlx-lm / mlx-community model folder.", show_default=False),
    source: str = typer.Option("stepfun-ai/Step-3.5-Flash", "--from", help="Original checkpoint repo on the Hub."),
    revision: Optional[str] = typer.Option(None, "--revision",
                                           help="Branch, tag or commit of --from (pinned to its commit either way).",
                                           show_default=False),
    bits: Optional[int] = typer.Option(None, "--bits", help="Quantize the heads to these bits (2,3,4,5,6,8); "
                                                            "default: the folder's own bits, float if unquantized.",
                                       show_default=False),
    restore: bool = typer.Option(False, "--restore", help="Also fetch the float routers and exact zero-centred norms "
                                                          "(about 100 MB; used by step35-mlx, not by mlx-lm)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be downloaded and written; write nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from ..convert.graft import graft_mtp as run_graft
    from ..convert.source import ConvertError

    if not folder.is_dir():
        fail(f"{folder} is not a folder")
    try:
        if bits is not None:
            from ..quant.recipes import QuantSpec

            QuantSpec(bits)
        if dry_run:
            _dry_run(folder, source, revision, bits, restore)
            return
        bar = Progress(TextColumn("[bold]fetching MTP heads"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn(), console=Console(stderr=True), disable=quiet)
        task = bar.add_task("fetch", total=None, start=False)

        def progress(done: int, total: int) -> None:  # the bar appears once the tensor download starts
            if not bar.live.is_started:
                bar.start()
                bar.start_task(task)
            bar.update(task, completed=done, total=total)

        try:
            result = run_graft(folder, source, revision, bits=bits, restore=restore, progress=progress)
        finally:
            if bar.live.is_started:
                bar.stop()
    except KeyboardInterrupt:
        typer.secho("interrupted; run the same command again to resume (downloaded bytes are kept)",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)
    except (ConvertError, ValueError, OSError) as e:
        fail(str(e))
    rec = result.record
    if result.plan is None:
        typer.echo(f"{folder} already has its MTP heads (from {rec['repo']}@{rec['revision']}); nothing to do")
        return
    plan = result.plan
    what = [f"{plan.mtp_layers} MTP layers ({len(plan.tensors)} tensors)"] if plan.tensors else []
    if plan.restore:
        what.append(f"{len(plan.restore.tensors)} float routers and norms")
    typer.echo(f"grafted {' and '.join(what)} from {plan.repo}@{plan.revision}: {_gb(result.received)} downloaded, "
               f"{_gb(plan.shard_bytes)} written to {folder}. Try: step35-mlx generate --model {folder} --mtp")
