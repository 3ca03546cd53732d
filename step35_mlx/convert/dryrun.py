"""``step35-mlx convert --dry-run``: exact output size per recipe and which Macs it fits.

Sizes come from :func:`step35_mlx.quant.recipes.plan_sizes` for a config (the built-in
copy of the Step 3.5 Flash release config when no SOURCE is given) or, for a local
source folder, from the conversion plan itself (the source's real dtypes and shapes).

Fit rule (printed with the table): the Mac rule of :mod:`step35_mlx.plan` -- by default
macOS lets the GPU wire about 75 % of unified memory on these Macs; a model "fits" when
its weights plus :func:`headroom` (what ``step35-mlx plan`` adds to the weights for a
32K context: 1.6 GB of KV for the 12 full-attention layers, 70 MB of sliding rings,
prefill activations and the fixed overhead -- 3.0 GB in all) stay under that. "fits*"
means it fits only after raising the limit (``sudo sysctl iogpu.wired_limit_mb=N``) to
RAM minus 8 GiB for macOS and apps. ``step35-mlx plan`` gives the exact figure for any
context and KV format.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..plan import MAC_SIZES_GB, OS_RESERVE, WeightSizes, mac_machine, plan_memory, verdict  # noqa: F401 (re-exported)
from ..quant.recipes import RECIPES, Recipe, plan_sizes

MACS_GB = MAC_SIZES_GB
HEADROOM_CONTEXT = 32768


@lru_cache(maxsize=None)
def headroom(context: int = HEADROOM_CONTEXT) -> int:
    """Bytes the planner adds to the release's weights for ``context`` tokens (bf16 KV, no MTP)."""
    from ..data import release_config

    return plan_memory(release_config(), recipe=WeightSizes(0, 0, "none"), context=context, mtp=False).total


def step3p5_flash_config() -> dict:
    """The released ``stepfun-ai/Step-3.5-Flash`` config.json (the copy bundled in ``step35_mlx.data``)."""
    from ..data import release_config

    return release_config()


@dataclass
class RecipeSize:
    recipe: Recipe
    trunk: int
    mtp: int
    trunk_params: int
    parts: dict

    @property
    def total(self) -> int:
        return self.trunk + self.mtp

    @property
    def bpw(self) -> float:
        return self.trunk * 8 / self.trunk_params


def fit(nbytes: int, ram_gb: int) -> str:
    """``"yes"`` (fits the default GPU limit), ``"raise"`` (fits after raising it), or ``"no"``."""
    return {"fits": "yes", "raise": "raise", "no": "no"}[verdict(nbytes + headroom(), mac_machine(ram_gb)).status]


def sizes_for_config(config: dict, recipes: list[Recipe] | None = None, source_dtype: str = "BF16") -> list[RecipeSize]:
    out = []
    for r in recipes or list(RECIPES.values()):
        s = plan_sizes(config, r, mtp=True, source_dtype=source_dtype)
        out.append(RecipeSize(r, s["trunk"], s["mtp"], s["trunk_params"], s))
    return out


def render_table(sizes: list[RecipeSize], chosen: str | None = None, title: str = "",
                 keep_mtp: bool = True) -> "object":
    """A Rich table: size without / with MTP, bits per weight, and Mac fit per RAM size."""
    from rich import box
    from rich.table import Table

    t = Table(title=title or None, box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left")
    t.add_column("recipe", no_wrap=True)
    t.add_column("GB", justify="right", no_wrap=True)
    t.add_column("+MTP", justify="right", no_wrap=True)
    t.add_column("bpw", justify="right", no_wrap=True)
    for gb in MACS_GB:
        t.add_column(f"{gb}G", justify="center", no_wrap=True, min_width=4)
    marks = {"yes": "[green]yes[/]", "raise": "[yellow]yes*[/]", "no": "[red]no[/]"}
    for s in sizes:
        name = ("> " if s.recipe.name == chosen else "  ") + s.recipe.name
        t.add_row(name, f"{s.trunk / 1e9:.1f}", f"{s.mtp / 1e9:.2f}", f"{s.bpw:.2f}",
                  *(marks[fit(s.total if keep_mtp else s.trunk, gb)] for gb in MACS_GB))
    return t


FIT_NOTE = (
    "GB = trunk weights (1e9 bytes, exact); +MTP = the 3 MTP modules (kept unless --drop-mtp); "
    "bpw = trunk bits per weight. Columns 64G..512G: does the model (with MTP unless --drop-mtp) "
    "fit a Mac with that much RAM? Assumes macOS lets the GPU use ~75% of RAM by default, with "
    "3.0 GB kept for a 32K context (KV cache, activations, runtime); yes* = only after raising that limit: "
    "sudo sysctl iogpu.wired_limit_mb=<RAM minus 8 GiB, in MiB>. Exact needs for any context and "
    "KV format: step35-mlx plan --recipe NAME --context N."
)
