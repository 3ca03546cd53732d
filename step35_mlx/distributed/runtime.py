"""Running a command on every rank: the fit check per rank, loading, and sharing rank 0's text."""

from __future__ import annotations

import atexit
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from ..plan import load_dtype_bytes, machine_memory
from .loading import load_distributed, tensor_index, tensor_sizes
from .pipeline import parse_split, split_by_memory
from .share import MODES, SUBSET_KEY, Layout, layer_bytes, rank_bytes


class ParallelSetupError(ValueError):
    """A user mistake in the distributed setup (one rank, bad split, does not fit)."""


@dataclass
class RankModel:
    model: object  # step35_mlx.Model (split)
    group: mx.distributed.Group
    weight_bytes: int  # the planned share of this rank
    path: Path
    config: ModelConfig


def _gather_floats(value: float, group: mx.distributed.Group) -> list[float]:
    return [float(v) for v in mx.distributed.all_gather(mx.array([value], dtype=mx.float32), group=group).tolist()]


def load_rank(locate: Callable[[], Path], mode: str, split: str | None, *, mtp: bool = True) -> RankModel:
    """Join the ``mlx.launch`` group, check this rank's share fits its memory, and load it.

    ``locate`` finds the model folder on this host. Every rank learns whether all ranks
    loaded: when one cannot (no folder, does not fit, wrong per-rank copy), all stop with an
    error instead of waiting for it forever.
    """
    if mode not in MODES:
        raise ParallelSetupError(f"--parallel {mode!r}: choose one of {', '.join(MODES)}")
    group = mx.distributed.init()
    n = group.size()
    if n == 1:
        raise ParallelSetupError("--parallel needs several ranks: start the command with "
                                 "`mlx.launch --hostfile hosts.json -- step35-mlx ...` (see README, Several Macs)")
    machine = machine_memory()
    limits = _gather_floats(machine.gpu_limit / 1e9, group)
    error: Exception | None = None
    try:
        path = locate()
        config = ModelConfig.from_file(path)
        sizes = tensor_sizes(tensor_index(path, config, mtp))
        counts = _stage_counts(config, mode, split, n, limits, sizes)
        layout = Layout(mode, n, config.moe_num_experts, counts)
        whole = config.raw.get(SUBSET_KEY) is not None  # a per-rank copy holds exactly this rank's share
        need = rank_bytes(sizes, Layout("tensor", 1) if whole else layout, 0 if whole else group.rank(),
                          load_dtype_bytes())
        if need > machine.gpu_limit:
            raise ParallelSetupError(
                f"rank {group.rank()} ({machine.name}) needs {need / 1e9:.1f} GB of weights for --parallel {mode} "
                f"but may use {machine.gpu_limit / 1e9:.1f} GB; `step35-mlx plan --hosts ...` shows what fits")
        model = load_distributed(path, mode, group, split=list(counts) or None, mtp=mtp)
    except (ValueError, OSError) as e:  # CheckpointError and the hub's errors are ValueErrors or OSErrors
        error = e
    failed = [int(v) for v in _gather_floats(float(error is not None), group)]
    if error is not None:
        raise ParallelSetupError(str(error)) from None
    if any(failed):
        bad = ", ".join(str(r) for r, f in enumerate(failed) if f)
        raise ParallelSetupError(f"rank {bad} could not load its share (its error is in its own output); stopping")
    atexit.register(barrier, group)
    return RankModel(model, group, need, path, config)


def _stage_counts(config: ModelConfig, mode: str, split: str | None, n: int, limits: list[float],
                  sizes: dict) -> tuple[int, ...]:
    if mode != "pipeline":
        if split is not None:
            raise ParallelSetupError("--split applies to --parallel pipeline only")
        return ()
    if split in (None, "auto"):  # by each rank's GPU memory limit, minus what every rank holds
        per_layer, shared = layer_bytes(sizes, config.num_hidden_layers, load_dtype_bytes())
        return tuple(split_by_memory(per_layer, [gb * 1e9 for gb in limits], shared))
    try:
        return tuple(parse_split(split, config.num_hidden_layers, n))
    except ValueError as e:
        raise ParallelSetupError(str(e)) from None


def barrier(group: mx.distributed.Group) -> None:
    """Wait for queued work and for every rank, so that no rank closes its sockets while others still talk."""
    mx.synchronize()
    mx.eval(mx.distributed.all_sum(mx.array([1], dtype=mx.int32), group=group))


def share_text(text: str, group: mx.distributed.Group | None) -> str:
    """``text`` as rank 0 has it, on every rank (prompts read from a terminal or stdin exist on rank 0 only)."""
    if group is None or group.size() == 1:
        return text
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8) if group.rank() == 0 else np.zeros(0, np.uint8)
    n = int(mx.distributed.all_sum(mx.array([data.size], dtype=mx.int32), group=group).item())
    buf = mx.zeros((n,), dtype=mx.int32)
    if group.rank() == 0:
        buf = mx.array(data.astype(np.int32))
    out = mx.distributed.all_sum(buf, group=group)
    return bytes(np.array(out).astype(np.uint8)).decode("utf-8")
