"""``step35-mlx plan``: will it fit, with how much context, and what to change (see :mod:`step35_mlx.plan`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from .common import fail

PLAN_HELP = (
    "Will Step 3.5 Flash fit this machine, with how much context, and what must change if not?\n\n"
    "Adds up, in GB (1e9 bytes): the weights (per quantization recipe, or a converted folder's real file "
    "sizes), the KV cache of the 12 full-attention layers (49,152 bytes per token at bf16, so 12.9 GB at "
    "256K), the fixed sliding-window caches, the MTP heads and their caches, the prefill activations and "
    "a fixed 1 GiB overhead. Then compares the total with what the GPU may use: on this machine, and on "
    "64 to 512 GB Macs, where macOS lets the GPU wire about 3/4 of the RAM unless you raise the limit with "
    "the printed `sudo sysctl iogpu.wired_limit_mb=N` (lasts until reboot). Last, the longest context that "
    "fits per recipe and KV format.\n\n"
    "Nothing is loaded; for a Hugging Face repo only its config.json is fetched.\n\n"
    "Without --model it plans the released Step 3.5 Flash from the bundled config.json, with the weights "
    "`step35-mlx convert --recipe NAME` would write (--recipe, default q4). A converted folder is planned "
    "from its real file sizes; an unconverted folder as it is, or as converted with --recipe.\n\n"
    "Examples:\n\n"
    "step35-mlx plan\n\n"
    "step35-mlx plan --recipe q3-mixed --context 128K\n\n"
    "step35-mlx plan --context 256K --kv-bits 8 --no-mtp\n\n"
    "step35-mlx plan --model ~/models/step35-q4 --context 64K\n\n"
    "step35-mlx plan --model stepfun-ai/Step-3.5-Flash --recipe q2-mixed --json"
)


@dataclass
class Target:
    """What to plan: a config, its weights (a recipe or measured sizes), a label."""

    config: Any  # ModelConfig
    weights: Any  # recipe name or WeightSizes
    label: str
    converted: bool = False
    activation_bytes: int = 2
    folder: Path | None = None  # planned from these files


def _hub_config(repo: str) -> dict:
    from ..hub import ModelNotFoundError

    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, "config.json")
    except Exception as e:  # noqa: BLE001 - network, auth and HTTP errors of several libraries
        raise ModelNotFoundError(
            f"cannot fetch config.json of {repo} from Hugging Face ({type(e).__name__}); "
            "check the name, log in for a gated repo, or pass a local folder"
        ) from None
    return json.loads(Path(path).read_text())


def resolve_target(model: Optional[str], recipe: Optional[str]) -> Target:
    """The config and weights to plan; raises ``ValueError`` / ``FileNotFoundError`` for user mistakes."""
    from ..config import ModelConfig
    from ..data import release_config
    from ..hub import DEMO_NAME, ModelNotFoundError, _looks_like_repo, resolve_model
    from ..mlx_lm_format import read_folder, remote_config
    from ..plan import folder_activation_bytes, folder_weight_sizes
    from ..quant.recipes import DEFAULT_RECIPE, get_recipe

    if recipe is not None and recipe.lower() != "bf16":
        get_recipe(recipe)  # unknown names fail here
    if model is None:
        return Target(ModelConfig.from_dict(release_config()), recipe or DEFAULT_RECIPE,
                      "Step 3.5 Flash (bundled release config.json)")
    folder: Path | None = None
    raw: dict | None = None
    path = Path(model).expanduser()
    if model == DEMO_NAME or path.exists() or not _looks_like_repo(model):
        folder = resolve_model(model, allow_download=False)
    else:
        try:
            folder = resolve_model(model, allow_download=False)  # already in the local HF cache
        except ModelNotFoundError:
            raw = remote_config(_hub_config(model))  # an mlx-lm repo: no MTP, its module names
    if folder is not None:
        fmt = read_folder(folder)  # an mlx-lm conversion: its real MTP count and module names
        cfg = fmt.config
        raw = cfg.raw
        name = str(folder)
    else:
        cfg = ModelConfig.from_dict(raw)
        name = model
    quant = raw.get("quantization")
    if quant:
        if recipe is not None:
            raise ValueError(f"{name} is already quantized; --recipe applies to the original release "
                             "(or plan the original with --model stepfun-ai/Step-3.5-Flash --recipe NAME)")
        if folder is not None and any(folder.glob("*.safetensors")):
            return Target(cfg, folder_weight_sizes(folder, folder_format=fmt), f"{name} (its files)", True,
                          folder_activation_bytes(folder), folder)
        from ..plan import weight_sizes

        return Target(cfg, weight_sizes(cfg, quant), f"{name} (its quantization block)", True)
    if folder is not None and any(folder.glob("*.safetensors")) and recipe is None:
        sizes = folder_weight_sizes(folder, folder_format=fmt)
        if sizes.recipe == "float":
            return Target(cfg, sizes, f"{name} (its files, unquantized)", True, folder_activation_bytes(folder),
                          folder)
    return Target(cfg, recipe or DEFAULT_RECIPE, f"{name} (config.json)")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f}"


def _size(n: int) -> str:
    """GB with two decimals, or MB / kB for the small parts of small models."""
    if n >= 10**7 or n == 0:
        return f"{n / 1e9:,.2f} GB"
    if n >= 10**4:
        return f"{n / 1e6:,.2f} MB"
    return f"{n / 1e3:,.2f} kB"


def _context_cell(n: int | None, wanted: int) -> str:
    if n is None:
        return "[dim]-[/]"
    if n <= 0:
        return "[red]no[/]"
    text = f"{n // 1024}K" if n >= 1024 else str(n)
    return f"[{'green' if n >= wanted else 'yellow'}]{text}[/]"


def _max_contexts(plan, machines) -> list[tuple[int, int | None]]:
    from ..plan import max_context

    out = []
    for m in machines:
        d = max_context(plan, m.gpu_limit)
        r = None
        if m.raise_target is not None and m.raise_target > m.gpu_limit:
            r = max_context(plan, m.raise_target)
        out.append((d, r))
    return out


def plan(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A converted folder (real file sizes), an original "
                                        "checkpoint folder, a Hugging Face repo id (only config.json is fetched) or "
                                        "'demo'. Default: the released Step 3.5 Flash from the bundled config."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Quantization recipe for an unconverted model: "
                                         "q8, q6, q4, q3-mixed, q2-mixed or bf16 (default q4)."),
    context: Optional[str] = typer.Option(None, "--context", "-c", help="Context length in tokens, e.g. 32768, 32K, "
                                          "256K (default: the model's maximum, 256K for Step 3.5 Flash)."),
    kv_bits: str = typer.Option("none", "--kv-bits", help="KV cache storage: none (bf16), 8 or 4 (group 64)."),
    mtp: bool = typer.Option(True, "--mtp/--no-mtp", help="Count the MTP heads (speculative decoding) and their caches."),
    prefill_step: int = typer.Option(512, "--prefill-step", help="Prompt tokens per prefill chunk (bounds activations)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan, the verdicts and the context table as JSON."),
    cache_ram: str = typer.Option("0", "--cache-ram", help="RAM budget of serve's prefix cache to count (e.g. 8GB; "
                                  "default 0)."),
    hosts: Optional[str] = typer.Option(None, "--hosts", help="Several Macs, e.g. 2x64GB or 128GB,64GB: per-rank "
                                        "memory of each --parallel mode and recipe, and the launch line."),
) -> None:
    from ..hub import ModelNotFoundError
    from ..plan import (
        GB, OS_RESERVE, GiB, InsufficientMemoryError, check_fit, common_macs, format_tokens, fused_attention_available,
        folder_weight_sizes, load_dtype_bytes, machine_memory, parse_kv_bits, parse_tokens, plan_memory, verdict,
        weight_sizes,
    )
    from ..prefix_cache import parse_budget
    from ..quant.recipes import RECIPES

    try:
        bits = parse_kv_bits(kv_bits)
        target = resolve_target(model, recipe)
        cfg = target.config
        limit = cfg.max_position_embeddings
        ctx = limit if context is None else parse_tokens(context)
        if not 1 <= ctx <= limit:
            raise ValueError(f"--context {context} is outside 1..{limit:,} (the model's maximum context)")
        if prefill_step < 1:
            raise ValueError("--prefill-step must be >= 1")
        if hosts is not None:
            from .parallel import print_hosts_plan

            return print_hosts_plan(cfg, hosts, recipe, ctx if context is not None else 32768)
        if mtp and not cfg.num_nextn_predict_layers:
            mtp = False
        ram = parse_budget(cache_ram, "--cache-ram")
        base = plan_memory(cfg, recipe=target.weights, context=ctx, kv_bits=bits, mtp=mtp,
                           prefill_step=prefill_step, activation_dtype_bytes=target.activation_bytes, prefix_cache=ram)
    except (ValueError, FileNotFoundError, ModelNotFoundError) as e:
        fail(str(e))

    here = machine_memory()
    db = load_dtype_bytes()  # the loader's float width on this machine (float32 on CPU), None = the files'

    def here_weights(w):
        """The weights as they would load on this machine."""
        if db is None:
            return w
        if target.folder is not None and w is target.weights:
            return folder_weight_sizes(target.folder, db)
        if getattr(w, "measured", False):
            return w
        name = w.recipe if hasattr(w, "recipe") else w
        return weight_sizes(cfg, name, source_dtype="F32")

    here_plan = base
    if not fused_attention_available() or db is not None:
        here_plan = base.replan(fused_attention=fused_attention_available(), recipe=here_weights(base.weights_source),
                                activation_dtype_bytes=db or base.activation_dtype_bytes)
    macs = common_macs()
    machines = [(here, here_plan)] + [(m, base) for m in macs]
    verdicts = [(m, p, verdict(p.total, m)) for m, p in machines]

    # rows of the context table: this checkpoint (when planned from its files), then every recipe
    rows: list[tuple[str, Any]] = []
    if target.converted:
        rows.append(("this model", base.weights_source))
        names = list(RECIPES)
    else:
        names = [base.recipe] + [n for n in RECIPES if n != base.recipe]
    rows += [(n, base.weights_source if n == base.recipe and not target.converted else weight_sizes(cfg, n))
             for n in names]
    table_rows = []
    for label, w in rows:
        for b in (None, 8, 4):
            try:
                p = base.replan(recipe=w, kv_bits=b)
            except ValueError:  # e.g. a head dim that 64-groups do not divide
                continue
            cells = _max_contexts(here_plan.replan(recipe=here_weights(w), kv_bits=b), [here]) + _max_contexts(p, macs)
            table_rows.append((label, b, p.weights + p.mtp_weights, cells))

    if as_json:
        out = {
            "model": target.label,
            "plan": base.to_dict(),
            "activations": base.activation_detail,
            "machines": [
                {"name": m.name, "total": m.total, "gpu_limit": m.gpu_limit, "source": m.source, "need": v.need,
                 "verdict": v.status, "raised_limit": v.raised_limit, "command": v.command}
                for m, _, v in verdicts
            ],
            "max_context": [
                {"weights": label, "kv_bits": b, "weights_bytes": wb,
                 "machines": {m.name: {"default": d, "raised": r} for (m, _), (d, r) in zip(machines, cells)}}
                for label, b, wb, cells in table_rows
            ],
        }
        typer.echo(json.dumps(out, indent=2))
        return

    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    kv_text = "bf16" if bits is None else f"{bits}-bit"
    t = Table(title=f"{target.label}: {base.recipe}, context {ctx:,} ({format_tokens(ctx)}), KV {kv_text}, "
                    f"MTP {'on' if base.mtp else 'off'}", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("part", no_wrap=True)
    t.add_column("size", justify="right", no_wrap=True)
    t.add_column("how")
    for name, n, how in base.parts():
        t.add_row(name, _size(n), how)
    t.add_row("[bold]total[/]", f"[bold]{_size(base.total)}[/]", f"{base.total / GiB:,.2f} GiB")
    console.print(t)

    v = Table(title="Does it fit?", box=box.SIMPLE_HEAD, title_justify="left", padding=(0, 1))
    v.add_column("machine", no_wrap=True)
    v.add_column("RAM (GiB)", justify="right")
    v.add_column("may use (GB)", justify="right")
    v.add_column("needs (GB)", justify="right")
    v.add_column("verdict", no_wrap=True)
    marks = {"fits": "[green]fits[/]", "raise": "[yellow]after raising the limit[/]", "no": "[red]does not fit[/]"}
    for m, p, vd in verdicts:
        v.add_row(m.name, f"{m.total / GiB:,.0f}", _gb(m.gpu_limit), _gb(p.total), marks[vd.status])
    console.print(v)
    console.print(f"[dim]this machine: {escape(here.source)}"
                  + ("; no GPU device for MLX: attention runs unfused and weights load as float32 here, so "
                     "it needs more than a Mac" if here_plan is not base else "") + "[/]")
    for m, _, vd in verdicts:
        if vd.command:
            console.print(f"{m.name}: raise the GPU limit to {_gb(vd.raised_limit)} GB (until reboot) with "
                          f"[bold]{vd.command}[/]")
    console.print()

    def context_table(title: str, raised: bool) -> Table:
        c = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", padding=(0, 1))
        c.add_column("weights", no_wrap=True)
        c.add_column("GB", justify="right")
        c.add_column("KV", no_wrap=True)
        if not raised:
            c.add_column("here", justify="right")
        for m in macs:
            c.add_column(m.name.replace(" Mac", ""), justify="right")
        for label, b, wb, cells in table_rows:
            values = [r for _, r in cells[1:]] if raised else [d for d, _ in cells]
            c.add_row(label if b is None else "", f"{wb / 1e9:.1f}" if b is None else "",
                      "bf16" if b is None else f"{b}-bit", *(_context_cell(x, ctx) for x in values))
        return c

    console.print(context_table(f"Longest context that fits, GPU limit as is (green: >= {format_tokens(ctx)})",
                                raised=False))
    console.print(context_table(f"Longest context after `sudo sysctl iogpu.wired_limit_mb=N` "
                                f"(N = RAM - {OS_RESERVE // GiB} GiB, in MiB)", raised=True))
    console.print(
        f"[dim]here = this machine ({here.source}). Macs: macOS's default GPU limit, 3/4 of the RAM (newer macOS "
        f"may allow a little more). no = not even one token. GB = {GB:.0e} bytes; K = 1024 tokens.[/]"
    )

    from ..plan.activations import dequantize_prefill_rows

    if dequantize_prefill_rows() is None:
        console.print("[dim]8-bit/4-bit KV: prefill attention over a quantized cache materialises heads x chunk x "
                      "context scores in this version, which limits long contexts; a smaller --prefill-step "
                      "lowers that.[/]")
    try:
        check_fit(here_plan, here)
    except InsufficientMemoryError as e:
        console.print("[yellow]On this machine:[/] " + escape(str(e)))
