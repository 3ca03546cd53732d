"""The ``convert``, ``verify`` and ``quant-eval`` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import fail

CONVERT_HELP = (
    "Convert Step 3.5 Flash (or Step 3.7 Flash's text model) to a quantized MLX folder.\n\n"
    "SOURCE is a Hugging Face repo id (default: stepfun-ai/Step-3.5-Flash) or a local checkpoint folder. "
    "Only the files needed are downloaded (safetensors, index, config, tokenizer, chat template, generation "
    "config); an interrupted download resumes, and a download that would not fit on the disk is refused up "
    "front.\n\n"
    "Conversion streams tensor by tensor (routed experts a few at a time), so memory stays far below the "
    "model size. Shards appear under their final names only when complete; rerunning the same command after "
    "an interruption resumes from the last finished shard. The three MTP heads are kept (--drop-mtp saves "
    "~1.4 GB at 4-bit). Both the bf16 and the FP8 releases work as sources.\n\n"
    "Recipes (--dry-run prints exact sizes and which Macs they fit):\n\n"
    "q8: 8-bit everywhere (~212 GB)\n\n"
    "q6: 6-bit everywhere (~162 GB)\n\n"
    "q4: 4-bit everywhere, group 64 (~112 GB; the default)\n\n"
    "q3-mixed: routed experts 3-bit, everything else 6-bit (~91 GB; 128 GB Macs)\n\n"
    "q2-mixed: routed experts 2-bit, attention/shared experts/heads 6-bit (~66 GB; 96 GB Macs)\n\n"
    "Routers stay in float; norms and router biases are never quantized.\n\n"
    "Examples:\n\n"
    "step35-mlx convert --dry-run\n\n"
    "step35-mlx convert --out ~/models/step35-q4\n\n"
    "step35-mlx convert stepfun-ai/Step-3.5-Flash-FP8 --recipe q3-mixed --out ~/models/step35-q3\n\n"
    "step35-mlx convert ~/hf/Step-3.5-Flash --bits 6 --out ./step35-6bit\n\n"
    "step35-mlx verify ~/models/step35-q4"
)


def _console():
    from rich.console import Console

    return Console(stderr=False)


def _pick_recipe(recipe: Optional[str], bits: Optional[int], group_size: Optional[int]):
    from ..quant.recipes import DEFAULT_RECIPE, get_recipe, uniform

    if recipe and (bits is not None or group_size is not None):
        raise ValueError("use either --recipe or --bits/--group-size, not both")
    if recipe:
        return get_recipe(recipe)
    if bits is None and group_size is None:
        return get_recipe(DEFAULT_RECIPE)
    return uniform(bits if bits is not None else 4, group_size if group_size is not None else 64)


def _dry_run(source: Optional[str], recipe, keep_mtp: bool, shard_size: int) -> None:
    from ..quant.recipes import RECIPES
    from ..convert.dryrun import FIT_NOTE, RecipeSize, render_table, sizes_for_config, step3p5_flash_config
    from ..convert.download import DEFAULT_REPO, looks_like_path
    from ..convert.quantize import make_plan
    from ..convert.source import ConvertError, SourceCheckpoint

    console = _console()
    recipes = list(RECIPES.values())
    if recipe.name not in RECIPES:
        recipes.append(recipe)
    p = Path(source).expanduser() if source else None
    if source is None or source == DEFAULT_REPO:
        title = f"{DEFAULT_REPO} (built-in copy of its config.json; bf16 source)"
        sizes = sizes_for_config(step3p5_flash_config(), recipes)
    elif p is not None and p.exists():
        title = f"{p} (from its safetensors headers)"
        sizes = []
        src = SourceCheckpoint(p, keep_mtp=True)
        for r in recipes:
            plan = make_plan(src, r, shard_size=shard_size)
            trunk = mtp = params = 0
            for it in (i for s in plan.shards for i in s.items):
                n = 1
                for d in it.src.shape:
                    n *= d
                if it.src.name.startswith("model.mtp."):
                    mtp += it.nbytes
                else:
                    trunk += it.nbytes
                    params += n
            sizes.append(RecipeSize(r, trunk, mtp, params, {}))
    elif looks_like_path(source):
        raise ConvertError(f"folder not found: {source}")
    else:
        config = _hub_config(source)
        title = f"{source} (config.json from the Hub; bf16 assumed)"
        sizes = sizes_for_config(config, recipes)
    console.print(render_table(sizes, chosen=recipe.name, title=title, keep_mtp=keep_mtp))
    console.print(FIT_NOTE)
    chosen = next(s for s in sizes if s.recipe.name == recipe.name)
    total = chosen.total if keep_mtp else chosen.trunk
    console.print(
        f"With --recipe {recipe.name}{'' if keep_mtp else ' --drop-mtp'}: {total / 1e9:.2f} GB "
        f"({chosen.trunk / 1e9:.2f} GB trunk + {chosen.mtp / 1e9:.2f} GB MTP"
        f"{' dropped' if not keep_mtp else ''})."
    )


def _hub_config(repo_id: str) -> dict:
    from ..convert.download import _hub_error
    from ..convert.source import ConvertError

    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
        path = hf_hub_download(repo_id, "config.json")
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ == "HFValidationError":
            raise ConvertError(f"{repo_id!r} is neither an existing folder nor a Hugging Face repo id") from None
        raise _hub_error(repo_id, e) from None
    return json.loads(Path(path).read_text())


def convert_cmd(
    source: Optional[str] = typer.Argument(
        None, help="Hub repo id (default stepfun-ai/Step-3.5-Flash) or a local checkpoint folder.",
        show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (new or empty; or a folder to resume)."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Uniform quantization bits (2,3,4,5,6,8); default 4.",
                                       show_default=False),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Group size (32, 64, 128); default 64.",
                                             show_default=False),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r",
                                         help="Named recipe: q8, q6, q4, q3-mixed, q2-mixed (default q4).",
                                         show_default=False),
    keep_mtp: bool = typer.Option(True, "--keep-mtp/--drop-mtp", help="Keep the 3 MTP modules (speculative heads)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Maximum output shard size, e.g. 5GB, 2GiB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print output sizes per recipe and which Macs they fit; "
                                                          "convert nothing."),
    download_dir: Optional[Path] = typer.Option(None, "--download-dir",
                                                help="Download into this folder instead of the Hugging Face cache."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    from ..quant.recipes import plan_sizes
    from ..convert.download import resolve_source
    from ..convert.dryrun import step3p5_flash_config
    from ..convert.quantize import convert_checkpoint, parse_size
    from ..convert.source import ConvertError

    console = _console()
    try:
        the_recipe = _pick_recipe(recipe, bits, group_size)
        size = parse_size(shard_size)
        if dry_run:
            _dry_run(source, the_recipe, keep_mtp, size)
            return
        if out is None:
            raise ConvertError("--out DIR is required (where to write the MLX model); add --dry-run to only "
                               "see sizes")
        out_dir = out.expanduser()
        estimate = plan_sizes(step3p5_flash_config(), the_recipe, mtp=keep_mtp)["total"]
        resolved = resolve_source(source, revision=revision, local_dir=download_dir, log=console.print,
                                  progress=not quiet, reserve=(out_dir, estimate))
        result = convert_checkpoint(resolved.path, out_dir, recipe=the_recipe, keep_mtp=keep_mtp,
                                    shard_size=size, label=resolved.label, progress=not quiet,
                                    log=console.print)
    except (ConvertError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume from the last complete shard", 130)
    plan = result.plan
    if not result.already_complete:
        console.print(
            f"[green]done[/]: {out_dir} ({plan.total_bytes / 1e9:.2f} GB, recipe {plan.recipe.name}, "
            f"{'with' if plan.keep_mtp else 'without'} MTP). Check it with: step35-mlx verify {out_dir}"
        )


def verify_cmd(
    folder: Path = typer.Argument(..., help="A folder written by `step35-mlx convert`."),
    deep: bool = typer.Option(False, "--deep", help="Also read every shard and compare its sha256 with the "
                                                    "checksum recorded at conversion (minutes for the full model)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar for --deep."),
) -> None:
    """Check a converted folder: config, every expected tensor (name, shape, dtype), shard integrity.

    By default reads only config.json, the index and the shard headers, so it takes seconds
    even for the full model: config.json parses exactly as `load` parses it; every shard's
    header is valid and its file exactly as long as the header says; the index matches the
    shards; every tensor the model expects is present with the right shape and dtype, and
    nothing else; no unfinished conversion is left. --deep also hashes every shard's bytes
    and compares them with the sha256 the converter recorded, naming any shard whose data
    changed. Exit code 0 when everything is in order, 1 when problems are found, 2 when the
    folder cannot be checked at all (missing, or config.json invalid).

    Example: step35-mlx verify ~/models/step35-q4 --deep
    """
    from ..convert.verify import verify

    if not folder.expanduser().is_dir():
        fail(f"folder not found: {folder}")
    rep = verify(folder.expanduser(), deep=deep, progress=deep and not quiet)
    if rep.fatal:
        fail(rep.fatal)
    for line in rep.summary().splitlines():
        color = typer.colors.RED if line.startswith(("problem", "FAILED")) else (
            typer.colors.YELLOW if line.startswith("warning") else (typer.colors.GREEN if line == "OK" else None))
        typer.secho(line, fg=color)
    if not rep.ok:
        raise typer.Exit(1)


def quant_eval_cmd(
    quantized: Path = typer.Argument(..., help="Quantized MLX folder to evaluate."),
    reference: Path = typer.Option(..., "--reference", help="Reference folder: the source checkpoint, or a "
                                                            "higher-precision conversion (e.g. q8)."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file to evaluate on (default: a short "
                                                             "built-in mixed English/code/math sample)."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Evaluate on at most this many tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Measure what quantization costs: KL(reference || quantized) and top-1 agreement.

    Both models run the same text (teacher forcing, float32); lower KL and higher
    agreement are better. Use it to compare recipes on the demo model, or on the full
    model against a q8 conversion (the bf16 original does not fit a Mac's memory).

    Example: step35-mlx quant-eval ./demo-q4 --reference ./demo-model --text notes.txt
    """
    from ..quant.quality import quant_eval

    for d in (quantized, reference):
        if not d.expanduser().is_dir():
            fail(f"folder not found: {d}")
    sample = None
    if text is not None:
        if not text.expanduser().is_file():
            fail(f"text file not found: {text}")
        sample = text.expanduser().read_text(encoding="utf-8", errors="replace")
    try:
        m = quant_eval(quantized.expanduser(), reference.expanduser(), text=sample, max_tokens=max_tokens)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(
        f"tokens {m['num_tokens']}: KL {m['kl']:.5f} nats (p99 {m['kl_p99']:.4f}, max {m['kl_max']:.4f}), "
        f"top-1 agreement {100 * m['top1_agreement']:.1f}%, "
        f"ppl {m['ppl_quantized']:.3f} vs reference {m['ppl_reference']:.3f}"
    )
