"""Named quantization recipes and exact output-size arithmetic.

A recipe maps every tensor of the model to either a quantization spec (MLX affine
quantization: ``bits`` and ``group_size``, bf16 scale and bias per group) or
"keep in float". Tensors are classified by their internal name (see
``loader.hf_to_internal``) into *kinds*: ``embed``, ``lm_head``, ``attention``
(q/k/v/o/g projections), ``dense_mlp`` (layers 0-2), ``routed_experts`` (the fused
``moe.{gate,up,down}_proj``), ``shared_experts``, ``router`` (``moe.gate``),
``router_bias``, ``norm``, and for the MTP modules ``eh_proj`` / ``mtp_head``
(each module's own ``shared_head.output``).

Fixed policy, whatever the recipe:

* norms stay float, zero-centred as in the checkpoint (the model adds the 1);
* ``router_bias`` stays float32;
* the router ``moe.gate`` stays float (the checkpoint's bf16; the model runs it in
  float32). Decided by measurement (``benchmarks/router_precision.py``): with the
  real router shape (4096 -> 288 experts, top-8, random bf16 weights and inputs, 4096
  tokens) an 8-bit g64 router leaves the top-8 *set* unchanged for only 92.1 % of
  tokens per layer (89.9 % with heavy-tailed weights; 6-bit 78 %, 4-bit 39 %); on a
  tiny synthetic Step model (64 experts, top-8), on the hidden states that really reach
  each router, 8-bit keeps 97.5 % (6-bit 93 %, 4-bit 75 %). Over 42 MoE layers that
  changes at least one expert choice for most tokens, while keeping all 42 routers in
  bf16 costs 46 MB (99 MB instead of 53 MB at 8-bit, 0.04 % of a q4 model) — so float.

Recipes (bits per weight include the bf16 scale + bias per group: ``bits + 32/group``);
sizes for Step 3.5 Flash, trunk + the 3 MTP modules, GB = 1e9 bytes:

========= ============================================================ ==============
name      what                                                         size
========= ============================================================ ==============
q8        everything 8-bit g64 (8.5 bpw)                               209.3 + 2.6
q6        everything 6-bit g64 (6.5 bpw)                               160.1 + 2.0
q4        everything 4-bit g64 (4.5 bpw), like mlx-community's 4-bit   110.9 + 1.4
q3-mixed  routed experts 3-bit g64; attention, shared experts, dense    88.7 + 2.0
          MLP, embedding, lm_head and MTP 6-bit g64 (3.60 bpw)
q2-mixed  routed experts 2-bit g64; attention, shared experts, dense    64.8 + 1.4
          MLP, lm_head 6-bit; embedding and MTP 4-bit (2.63 bpw)
========= ============================================================ ==============

(``step35-mlx convert --dry-run`` prints the exact figures and which Macs they fit:
q2-mixed is the one for 96 GB Macs, q3-mixed for 128 GB at the default GPU memory
limit, q4 for 128 GB after raising it. None targets 64 GB Macs: even 2-bit g128
everywhere (2.25 bpw, 55.4 GB) would need a raised GPU limit and cost too much quality.)
The routed experts are 190.3 B of the 196.96 B trunk parameters, so the expert bits
decide the size; everything else is small and touched by every token, so the mixed
recipes keep it at 6 bits (embedding rows are read one per token, so 4 bits there cost
little quality and save 0.13 GB in q2-mixed). MTP layers only draft tokens (a worse
draft lowers acceptance, never output quality), so q2-mixed keeps them at 4 bits.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Iterable

from ..config import ModelConfig

# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class QuantSpec:
    """MLX affine quantization along the last axis: ``bits`` per weight, one scale + bias per ``group_size``."""

    bits: int
    group_size: int = 64

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"bits must be one of 2, 3, 4, 5, 6, 8 (MLX affine quantization), got {self.bits}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group size must be 32, 64 or 128, got {self.group_size}")

    @property
    def bpw(self) -> float:
        """Bits per weight with bf16 scale and bias."""
        return self.bits + 32 / self.group_size

    def as_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits}


KINDS = (
    "embed", "lm_head", "attention", "dense_mlp", "routed_experts", "shared_experts",
    "router", "router_bias", "norm", "eh_proj", "mtp_head",
)
# Kinds a recipe may set (norms and router_bias are always float).
SETTABLE = ("embed", "lm_head", "attention", "dense_mlp", "routed_experts", "shared_experts",
            "router", "mtp", "mtp_head", "vision")

_MTP = re.compile(r"^model\.mtp\.\d+\.")


def classify(name: str) -> tuple[str, str]:
    """``(group, kind)`` of an internal tensor name; group is ``"trunk"``, ``"mtp"`` or ``"vision"``."""
    if name.startswith("vision."):
        return "vision", "vision"
    group = "mtp" if _MTP.match(name) else "trunk"
    if name.endswith(".router_bias"):
        return group, "router_bias"
    if name == "model.embed_tokens.weight":
        return group, "embed"
    if name == "lm_head.weight":
        return group, "lm_head"
    leaf = name.rsplit(".", 2)
    if len(leaf) == 3 and leaf[2] == "weight" and "norm" in leaf[1]:
        return group, "norm"
    if ".shared_head.output." in name:
        return group, "mtp_head"
    if ".eh_proj." in name:
        return group, "eh_proj"
    if ".moe.gate." in name:
        return group, "router"
    if re.search(r"\.moe\.(gate|up|down)_proj\.", name):
        return group, "routed_experts"
    if ".share_expert." in name:
        return group, "shared_experts"
    if ".self_attn." in name:
        return group, "attention"
    if ".mlp." in name:
        return group, "dense_mlp"
    raise ValueError(f"cannot classify tensor {name!r}")


@dataclass(frozen=True)
class Recipe:
    """``default`` is the global spec (written as the config's global bits/group size);
    ``overrides`` maps a settable kind to a spec or ``None`` (keep float). The vision tower
    stays float unless ``overrides["vision"]`` sets a spec."""

    name: str
    description: str
    default: QuantSpec
    overrides: dict = field(default_factory=dict)

    def spec_for(self, name: str) -> QuantSpec | None:
        """The recipe's spec for a tensor (before shape checks); ``None`` keeps it float."""
        group, kind = classify(name)
        if kind in ("norm", "router_bias"):
            return None
        if group == "vision":
            return self.overrides.get("vision") if name.endswith(".weight") else None
        if group == "mtp":
            if kind == "mtp_head":
                return self.overrides.get("mtp_head", self.overrides.get("lm_head", self.default))
            return self.overrides.get("mtp", self._trunk(kind))
        return self._trunk(kind)

    def _trunk(self, kind: str) -> QuantSpec | None:
        if kind == "eh_proj":
            kind = "attention"
        return self.overrides.get(kind, self.default)

    def fingerprint(self) -> dict:
        return {
            "name": self.name,
            "default": self.default.as_config(),
            "overrides": {k: (v.as_config() if v else None) for k, v in sorted(self.overrides.items())},
        }


def effective_spec(spec: QuantSpec | None, shape: Iterable[int]) -> QuantSpec | None:
    """``spec`` adjusted to a tensor shape: 1-D tensors stay float; if the last dim is not a
    multiple of the group size, the largest smaller group size (64, 32) that divides it is used,
    else the tensor stays float."""
    shape = tuple(shape)
    if spec is None or len(shape) < 2:
        return None
    last = shape[-1]
    for g in (spec.group_size, 64, 32):
        if g <= spec.group_size and last % g == 0:
            return QuantSpec(spec.bits, g)
    return None


_ROUTER_FLOAT = {"router": None}


def uniform(bits: int, group_size: int = 64, name: str | None = None) -> Recipe:
    return Recipe(
        name or (f"q{bits}" if group_size == 64 else f"q{bits}-g{group_size}"),
        f"everything {bits}-bit, group {group_size} ({bits + 32 / group_size:g} bpw); router float",
        QuantSpec(bits, group_size),
        dict(_ROUTER_FLOAT),
    )


def _mixed(name: str, description: str, experts: int, rest: int, embed: int, mtp: int) -> Recipe:
    s = lambda b: QuantSpec(b, 64)  # noqa: E731
    return Recipe(
        name, description, s(experts),
        {
            "router": None,
            "attention": s(rest), "shared_experts": s(rest), "dense_mlp": s(rest),
            "lm_head": s(rest), "embed": s(embed), "mtp": s(mtp), "mtp_head": s(mtp),
        },
    )


RECIPES: dict[str, Recipe] = {
    "q8": uniform(8),
    "q6": uniform(6),
    "q4": uniform(4),
    "q3-mixed": _mixed(
        "q3-mixed",
        "routed experts 3-bit; attention, shared experts, dense MLP, embedding, heads and MTP 6-bit (g64)",
        experts=3, rest=6, embed=6, mtp=6,
    ),
    "q2-mixed": _mixed(
        "q2-mixed",
        "routed experts 2-bit; attention, shared experts, dense MLP, lm_head 6-bit; embedding and MTP 4-bit (g64)",
        experts=2, rest=6, embed=4, mtp=4,
    ),
}
DEFAULT_RECIPE = "q4"


def with_vision_bits(recipe: Recipe, bits: int, group_size: int = 64) -> Recipe:
    """``recipe`` with the Step 3.7 vision tower quantized to ``bits`` (8 or 4); ``ValueError`` otherwise."""
    if bits not in (4, 8):
        raise ValueError(f"--vision-bits must be 8 or 4, got {bits}")
    return dataclasses.replace(recipe, name=f"{recipe.name}+v{bits}",
                               overrides={**recipe.overrides, "vision": QuantSpec(bits, group_size)})


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


# ----------------------------------------------------------------------------- output tensors

BYTES_PER = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}


def compute_dtype(source_dtype: str) -> str:
    """Float dtype a source tensor is quantized in (and stored in when kept float): its own, or bf16 for fp8."""
    return source_dtype if source_dtype in ("F32", "F16", "BF16") else "BF16"


def output_tensors(name: str, shape: tuple[int, ...], source_dtype: str,
                   spec: QuantSpec | None) -> list[tuple[str, str, tuple[int, ...]]]:
    """``[(name, dtype, shape)]`` written for one model tensor: the tensor itself, or
    ``P.weight`` (uint32 packed), ``P.scales``, ``P.biases`` when quantized."""
    shape = tuple(int(d) for d in shape)
    if spec is None:
        return [(name, compute_dtype(source_dtype), shape)]
    if not name.endswith(".weight"):
        raise ValueError(f"only '.weight' tensors can be quantized, not {name}")
    base = name[: -len(".weight")]
    last = shape[-1]
    fdt = compute_dtype(source_dtype)
    groups = shape[:-1] + (last // spec.group_size,)
    return [
        (f"{base}.weight", "U32", shape[:-1] + (last * spec.bits // 32,)),
        (f"{base}.scales", fdt, groups),
        (f"{base}.biases", fdt, groups),
    ]


def tensor_bytes(entries: list[tuple[str, str, tuple[int, ...]]]) -> int:
    total = 0
    for _, dtype, shape in entries:
        n = BYTES_PER[dtype]
        for d in shape:
            n *= d
        total += n
    return total


# ----------------------------------------------------------------------------- sizes


def model_config(config: ModelConfig | dict) -> ModelConfig:
    return config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)


def expected_tensors(config: ModelConfig | dict, mtp: bool = True,
                     vision: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """``[(internal name, shape)]`` of every parameter of the float model, in model order.

    Builds the MLX model lazily (no weights are materialised), so this is cheap even for
    the full 196B config. A Step 3.7 config adds its vision tower (``vision.*``) unless
    ``vision`` is false.
    """
    from mlx.utils import tree_flatten

    from ..model import Model

    cfg = model_config(config)
    if not mtp and cfg.num_nextn_predict_layers:
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    out = [(k, tuple(v.shape)) for k, v in tree_flatten(Model(cfg).parameters())]
    if vision:
        from ..vision.config import VisionConfig
        from ..vision.tower import VisionTower

        vcfg = VisionConfig.from_config(cfg.raw)
        if vcfg is not None:
            out += [("vision." + k, tuple(v.shape)) for k, v in tree_flatten(VisionTower(vcfg).parameters())]
    return out


def source_dtype_for(name: str, default: str = "BF16") -> str:
    """Dtype assumed for a tensor of the released bf16 checkpoint (router_bias is float32)."""
    return "F32" if name.endswith(".router_bias") else default


PART_ORDER = ("embed", "lm_head", "attention", "dense_mlp", "routed_experts", "shared_experts",
              "router", "router_bias", "norms", "mtp", "vision")


def _part(name: str) -> str:
    group, kind = classify(name)
    if group in ("mtp", "vision"):
        return group
    return "norms" if kind == "norm" else kind


def plan_sizes(config: ModelConfig | dict, recipe: Recipe, *, mtp: bool = True,
               source_dtype: str = "BF16") -> dict[str, int]:
    """Exact output bytes per part for ``config`` under ``recipe`` (tensor data only; the
    safetensors headers add a few KB per shard).

    Quantized tensors count the packed weight plus one scale and one bias per group in the
    float dtype the source is quantized in (bf16 for the release); float tensors keep their
    source dtype (``router_bias`` float32). Keys: the parts of ``PART_ORDER`` (``mtp`` = all
    MTP modules with their heads, 0 when ``mtp`` is false; ``vision`` = a Step 3.7 vision
    tower), ``trunk`` (everything but MTP, vision included),
    ``total``, and ``params`` / ``trunk_params`` (parameter counts).
    """
    sizes = {p: 0 for p in PART_ORDER}
    params = trunk_params = 0
    for name, shape in expected_tensors(config, mtp=mtp):
        spec = effective_spec(recipe.spec_for(name), shape)
        n = tensor_bytes(output_tensors(name, shape, source_dtype_for(name, source_dtype), spec))
        part = _part(name)
        sizes[part] += n
        count = 1
        for d in shape:
            count *= d
        params += count
        if part != "mtp":
            trunk_params += count
    sizes["trunk"] = sum(v for k, v in sizes.items() if k != "mtp")
    sizes["total"] = sizes["trunk"] + sizes["mtp"]
    sizes["params"] = params
    sizes["trunk_params"] = trunk_params
    return sizes
