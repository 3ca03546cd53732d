"""Per-host copies of a checkpoint: each holds only what one rank loads (``step35-mlx split-model``).

For ``--parallel pipeline`` a rank's copy holds its layers' tensors plus the shared ones; for
tensor and expert parallelism it holds the slices of each tensor the rank reads. The copy
records the layout it was cut for; loading it for another layout or rank is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ModelConfig
from ..loader import INDEX_FILE
from .loading import TensorRef, build_model, read_slice, slice_for, tensor_index
from .pipeline import split_layers
from .share import MODES, SUBSET_KEY, Layout



@dataclass
class SubsetResult:
    path: Path
    tensors: int
    nbytes: int


class _SoloGroup:
    """The rank and size a subset is cut for (no communication happens while cutting)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def write_rank_subset(src: str | Path, out: str | Path, mode: str, ranks: int, rank: int, *,
                      split: list[int] | None = None, shard_bytes: int = 5 * 10**9) -> SubsetResult:
    """Write into ``out`` what rank ``rank`` of ``ranks`` reads for ``mode`` from the checkpoint ``src``."""
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty")
    config = ModelConfig.from_file(src)
    if SUBSET_KEY in config.raw:
        raise ValueError(f"{src} is already a per-rank copy; cut from the full checkpoint")
    counts = tuple(split or split_layers(config.num_hidden_layers, [1.0] * ranks)) if mode == "pipeline" else ()
    layout = Layout(mode, ranks, config.moe_num_experts, counts)
    index = tensor_index(src, config)
    model, first = build_model(config, index, layout, _SoloGroup(rank, ranks))
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(f, out / f.name)
    raw = json.loads((src / "config.json").read_text())
    raw[SUBSET_KEY] = {"mode": mode, "ranks": ranks, "rank": rank, "split": list(counts)}
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    files: list[dict[str, mx.array]] = [{}]
    size = [0]
    weight_map, total, n = {}, 0, 0
    for name, param in tree_flatten(model.parameters()):
        g, ref, sl = slice_for(name, param, first, index, layout, rank)
        key = _file_key(ref)
        a = read_slice(ref, *sl) if sl else read_slice(ref)
        if size[-1] and size[-1] + a.nbytes > shard_bytes:
            files.append({})
            size.append(0)
        files[-1][key] = a
        size[-1] += a.nbytes
        total += a.nbytes
        n += 1
    for i, tensors in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        mx.save_safetensors(str(out / fname), tensors, metadata={"format": "mlx"})
        weight_map.update({k: fname for k in tensors})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return SubsetResult(out, n, total)


def _file_key(ref: TensorRef) -> str:
    return ref.info.name
