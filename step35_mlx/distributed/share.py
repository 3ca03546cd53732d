"""Which part of each checkpoint tensor a rank holds, and how many bytes that is.

Pure arithmetic on tensor names and shapes (no model is built): the planner uses it
for the release, and the tests compare it with what a rank really loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .expert import expert_range

MODES = ("tensor", "expert", "pipeline")
_TP_SPLIT = re.compile(r"\.(self_attn\.[qkvgo]_proj|mlp\.\w+_proj|share_expert\.\w+_proj|moe\.(gate|up|down)_proj)\.")
_EXPERTS = re.compile(r"\.moe\.(gate|up|down)_proj\.")
_TRUNK = re.compile(r"^model\.layers\.(\d+)\.")
_FP32_SUFFIXES = (".router_bias", ".moe.gate.weight")
SUBSET_KEY = "step35_mlx_rank_subset"  # config.json of a per-rank copy (distributed.subset)


@dataclass(frozen=True)
class Layout:
    """How a model is split: ``mode`` over ``ranks``; ``counts`` = trunk layers per stage (pipeline)."""

    mode: str
    ranks: int
    num_experts: int = 0
    counts: tuple[int, ...] = ()

    def fraction(self, name: str, rank: int) -> float:
        """The fraction of tensor ``name`` (internal name) that ``rank`` holds."""
        if self.mode == "tensor":
            return 1 / self.ranks if _TP_SPLIT.search(name) else 1.0
        if self.mode == "expert":
            if _EXPERTS.search(name):
                return len(expert_range(self.num_experts, self.ranks, rank)) / self.num_experts
            return 1.0
        if self.mode == "pipeline":
            m = _TRUNK.match(name)
            if not m:
                return 1.0
            first = sum(self.counts[:rank])
            return 1.0 if first <= int(m.group(1)) < first + self.counts[rank] else 0.0
        raise ValueError(f"unknown parallel mode {self.mode!r}; choose one of {', '.join(MODES)}")


def loaded_itemsize(name: str, stored_itemsize: int, floating: bool, load_itemsize: int | None) -> int:
    """Bytes per element once loaded: norms, router and its bias stay float32; other floats take the load dtype."""
    if not floating:
        return stored_itemsize
    last = name.rsplit(".", 2)
    if name.endswith(_FP32_SUFFIXES) or (name.endswith(".weight") and "norm" in last[-2]):
        return 4
    return load_itemsize or stored_itemsize


def rank_bytes(tensors: dict[str, tuple[tuple[int, ...], int, bool]], layout: Layout, rank: int,
               load_itemsize: int | None = None) -> int:
    """Parameter bytes rank ``rank`` holds; ``tensors``: internal name -> (shape, stored itemsize, floating)."""
    total = 0
    for name, (shape, itemsize, floating) in tensors.items():
        n = 1
        for d in shape:
            n *= d
        total += round(n * layout.fraction(name, rank)) * loaded_itemsize(name, itemsize, floating, load_itemsize)
    return total


def check_subset(config, layout: Layout, rank: int) -> None:
    """Refuse a per-rank copy cut for another layout or rank."""
    cut = config.raw.get(SUBSET_KEY)
    if cut is None:
        return
    want = {"mode": layout.mode, "ranks": layout.ranks, "rank": rank, "split": list(layout.counts)}
    if cut != want:
        raise ValueError(f"this folder is the copy for rank {cut['rank']} of {cut['ranks']} with --parallel "
                         f"{cut['mode']}" + (f" --split {','.join(map(str, cut['split']))}" if cut["split"] else "")
                         + f"; this is rank {rank} of {layout.ranks} with --parallel {layout.mode}")


def layer_bytes(tensors: dict[str, tuple[tuple[int, ...], int, bool]], num_layers: int,
                load_itemsize: int | None = None) -> tuple[list[int], int]:
    """(bytes of each trunk layer, bytes of everything else) once loaded."""
    per_layer, other = [0] * num_layers, 0
    for name, (shape, itemsize, floating) in tensors.items():
        n = loaded_itemsize(name, itemsize, floating, load_itemsize)
        for d in shape:
            n *= d
        m = _TRUNK.match(name)
        if m:
            per_layer[int(m.group(1))] += n
        else:
            other += n
    return per_layer, other
