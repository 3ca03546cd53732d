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
    """The released ``stepfun-ai/Step-3.5-Flash`` config.json (same values, rebuilt from its patterns)."""
    n = 48
    full = [i % 4 == 0 for i in range(n)]
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "auto_map": {
            "AutoConfig": "configuration_step3p5.Step3p5Config",
            "AutoModelForCausalLM": "modeling_step3p5.Step3p5ForCausalLM",
        },
        "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 131072,
                         "low_freq_factor": 1.0, "high_freq_factor": 32.0},
        "yarn_only_types": ["full_attention"],
        "hidden_size": 4096,
        "intermediate_size": 11264,
        "num_hidden_layers": 45,
        "max_seq_len": 262144,
        "vocab_size": 128896,
        "torch_dtype": "bfloat16",
        "use_qk_norm": True,
        "moe_layers_enum": ",".join(str(i) for i in range(3, 45)),
        "num_attention_heads": 64,
        "num_attention_groups": 8,
        "head_dim": 128,
        "use_moe": True,
        "moe_num_experts": 288,
        "moe_top_k": 8,
        "moe_intermediate_size": 1280,
        "share_expert_dim": 1280,
        "moe_layer_offset": 0,
        "moe_every_n_layer": 1,
        "norm_expert_weight": True,
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": 3.0,
        "att_impl_type": "GQA",
        "tie_word_embeddings": False,
        "rope_theta": [5000000.0 if f else 10000.0 for f in full],
        "use_head_wise_attn_gate": True,
        "sliding_window": 512,
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "sink": False,
        "layer_types": ["full_attention" if f else "sliding_attention" for f in full],
        "use_rope_layers": [],
        "num_nextn_predict_layers": 3,
        "partial_rotary_factors": [0.5 if f else 1.0 for f in full],
        "eos_token_id": [1, 2, 128007],
        "bos_token_id": 0,
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 96,
                                    "num_attention_groups": 8, "head_dim": 128, "true_head_dim": 128},
        "swiglu_limits": [7 if i in (43, 44) else 0.0 for i in range(n)],
        "swiglu_limits_shared": [16 if i == 44 else 0.0 for i in range(n)],
        "zero_centered": True,
        "max_position_embeddings": 262144,
    }


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
