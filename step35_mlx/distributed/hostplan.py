"""Per-rank memory for each parallel mode on a set of Macs (``step35-mlx plan --hosts 2x64GB``).

Weights per rank come from the recipe's exact tensor sizes split by ``share.Layout``; the KV
cache, activations and overhead from ``plan.plan_memory`` (tensor parallelism divides the KV
heads, pipeline gives each stage its layers' caches, expert parallelism keeps all of it).
Pipeline stages get layers in proportion to each Mac's room (usable memory minus what every rank holds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ModelConfig
from ..plan import MachineMemory, MemoryPlan, WeightSizes, mac_machine, plan_memory, verdict
from ..quant.recipes import BYTES_PER, Recipe, effective_spec, expected_tensors, get_recipe, output_tensors, source_dtype_for
from .pipeline import split_by_memory
from .share import MODES, Layout, layer_bytes, rank_bytes
from .tensor import tensor_split_problems

_HOSTS = re.compile(r"^(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*(?:GB|G|GiB)?$", re.IGNORECASE)


def parse_hosts(text: str) -> list[float]:
    """``"2x64GB"`` -> ``[64, 64]``; ``"128GB,64GB"`` -> ``[128, 64]`` (GB of RAM per Mac)."""
    out: list[float] = []
    for part in text.split(","):
        m = _HOSTS.match(part.strip())
        if not m or float(m.group(2)) <= 0:
            raise ValueError(f"--hosts {text!r}: expected sizes such as 2x64GB or 128GB,64GB")
        out += [float(m.group(2))] * int(m.group(1) or 1)
    if len(out) < 2:
        raise ValueError(f"--hosts {text!r}: name at least two Macs (e.g. 2x64GB)")
    return out


def recipe_tensor_sizes(config: ModelConfig, recipe: Recipe) -> dict[str, tuple[tuple[int, ...], int, bool]]:
    """Every tensor a conversion with ``recipe`` holds: name -> (shape, itemsize, floating)."""
    out = {}
    for name, shape in expected_tensors(config):
        spec = effective_spec(recipe.spec_for(name), shape)
        for n, dt, sh in output_tensors(name, shape, source_dtype_for(name), spec):
            out[n] = (sh, BYTES_PER[dt], dt != "U32")
    return out


@dataclass(frozen=True)
class RankNeed:
    host: MachineMemory
    weights: int
    kv: int
    other: int  # activations + overhead

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.other


@dataclass(frozen=True)
class ModePlan:
    mode: str
    ranks: list[RankNeed]
    counts: tuple[int, ...]
    problem: str | None  # why the mode cannot run at all (tensor split limits)

    @property
    def fits(self) -> bool:
        return self.problem is None and all(verdict(r.total, r.host).status != "no" for r in self.ranks)


def plan_hosts(config: ModelConfig, hosts_gb: list[float], *, recipe: str = "q4", context: int = 32768,
               tensor_problems: list | None = None) -> list[ModePlan]:
    """One ``ModePlan`` per parallel mode for Macs with ``hosts_gb`` GB of RAM."""
    r = get_recipe(recipe)
    sizes = recipe_tensor_sizes(config, r)
    base = plan_memory(config, recipe=r, context=context)
    hosts = [mac_machine(gb) for gb in hosts_gb]
    n = len(hosts)
    other = base.activations + base.overhead
    per_layer, shared = layer_bytes(sizes, config.num_hidden_layers)
    counts = tuple(split_by_memory(per_layer, [h.raise_target or h.gpu_limit for h in hosts], shared + other))
    plans = []
    for mode in MODES:
        layout = Layout(mode, n, config.moe_num_experts, counts if mode == "pipeline" else ())
        ranks = []
        for i, h in enumerate(hosts):
            kv = rank_kv(config, layout, i, base)
            ranks.append(RankNeed(h, rank_bytes(sizes, layout, i), kv, other))
        problem = None
        if mode == "tensor" and tensor_problems:
            problem = tensor_problems[0]
        plans.append(ModePlan(mode, ranks, counts if mode == "pipeline" else (), problem))
    return plans


def rank_kv(config: ModelConfig, layout: Layout, rank: int, plan: MemoryPlan) -> int:
    """The part of ``plan``'s KV cache that ``rank`` holds: 1/N of the heads (tensor), all of it
    (expert), or its stage's layers' caches plus the MTP caches (pipeline)."""
    if layout.mode == "tensor":
        return plan.kv // layout.ranks
    if layout.mode == "expert":
        return plan.kv
    first, last = _stage(layout.counts, rank)
    sliding = [config.layer(j).is_sliding for j in range(config.num_hidden_layers)]
    mine = sliding[first:last]
    full_share = (mine.count(False) / sliding.count(False)) if False in sliding else 0.0
    sliding_share = (mine.count(True) / sliding.count(True)) if True in sliding else 0.0
    return int(plan.full_kv * full_share + plan.sliding_kv * sliding_share) + plan.mtp_kv


def rank_memory(config: ModelConfig, layout: Layout, rank: int, weights: int, context: int, *, mtp: bool,
                kv_bits: int | None = None, activation_bytes: int = 2, fused_attention: bool = True) -> int:
    """Bytes rank ``rank`` needs: its ``weights`` plus its KV cache for ``context`` tokens, activations, overhead."""
    plan = plan_memory(config, recipe=WeightSizes(0, int(mtp), "share"), context=context, mtp=mtp, kv_bits=kv_bits,
                       activation_dtype_bytes=activation_bytes, fused_attention=fused_attention)
    return weights + rank_kv(config, layout, rank, plan) + plan.activations + plan.overhead


def rank_context(config: ModelConfig, layout: Layout, rank: int, weights: int, limit: int, **kw) -> int:
    """The longest context (at most the model's) for which ``rank_memory`` stays within ``limit``; 0 if none."""
    lo, hi = 0, config.max_position_embeddings
    if rank_memory(config, layout, rank, weights, hi, **kw) <= limit:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if rank_memory(config, layout, rank, weights, mid, **kw) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _stage(counts: tuple[int, ...], i: int) -> tuple[int, int]:
    first = sum(counts[:i])
    return first, first + counts[i]


def release_tensor_problems(config: ModelConfig, recipe: str, ranks: int) -> list[str]:
    """Why ``recipe`` of this config cannot be tensor-split ``ranks`` ways (lazy model, nothing drawn)."""
    import mlx.nn as nn

    from ..model import Model

    r = get_recipe(recipe)
    model = Model(config)

    def pred(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        spec = effective_spec(r.spec_for(f"{path}.weight"), module.weight.shape)
        return {"group_size": spec.group_size, "bits": spec.bits} if spec else False

    nn.quantize(model, class_predicate=pred)
    return [f"{p.where}: {p.what}" for p in tensor_split_problems(model, ranks)]


def launch_line(mode: str, counts: tuple[int, ...] = (), model: str = "~/models/step35-q4") -> str:
    """The command that runs ``mode`` on the Macs of ``hosts.json``."""
    split = f" --split {','.join(map(str, counts))}" if mode == "pipeline" and counts else ""
    return f"mlx.launch --hostfile hosts.json --backend ring -- step35-mlx chat --model {model} --parallel {mode}{split}"
