"""Running a command on every rank: the fit check per rank, loading, and sharing rank 0's text."""

from __future__ import annotations

import atexit
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from ..plan import (MIN_CONTEXT, folder_activation_bytes, fused_attention_available, load_dtype_bytes,
                    machine_memory, set_wired_limit)
from .hostplan import rank_context, rank_memory
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
    context_limit: int  # tokens, the same on every rank


def _gather_floats(value: float, group: mx.distributed.Group) -> list[float]:
    return [float(v) for v in mx.distributed.all_gather(mx.array([value], dtype=mx.float32), group=group).tolist()]


def load_rank(locate: Callable[[], Path], mode: str, split: str | None, *, mtp: bool = True,
              max_context: int | None = None, kv_bits: int | None = None) -> RankModel:
    """Join the ``mlx.launch`` group, check this rank's share fits its memory, and load it.

    ``locate`` finds the model folder on this host. Before any weight is read every rank
    computes the longest context its memory allows (weights + its part of the KV cache +
    activations); all ranks take the shortest, or check ``max_context`` against each. Every
    rank learns whether all ranks can go on: when one cannot (no folder, does not fit, wrong
    per-rank copy), all stop with an error instead of waiting for it forever.
    """
    if mode not in MODES:
        raise ParallelSetupError(f"--parallel {mode!r}: choose one of {', '.join(MODES)}")
    group = mx.distributed.init()
    n, rank = group.size(), group.rank()
    if n == 1:
        raise ParallelSetupError("--parallel needs several ranks: start the command with "
                                 "`mlx.launch --hostfile hosts.json -- step35-mlx ...` (see README, Several Macs)")
    machine = machine_memory()
    limits = _gather_floats(machine.gpu_limit / 1e9, group)
    error: Exception | None = None
    fits = 0
    try:
        path = locate()
        config = ModelConfig.from_file(path)
        sizes = tensor_sizes(tensor_index(path, config, mtp))
        counts = _stage_counts(config, mode, split, n, limits, sizes)
        layout = Layout(mode, n, config.moe_num_experts, counts)
        whole = config.raw.get(SUBSET_KEY) is not None  # a per-rank copy holds exactly this rank's share
        db = load_dtype_bytes()
        need = rank_bytes(sizes, Layout("tensor", 1) if whole else layout, 0 if whole else rank, db)
        fit_kw = dict(mtp=mtp and config.num_nextn_predict_layers > 0, kv_bits=kv_bits,
                      activation_bytes=folder_activation_bytes(path, db), fused_attention=fused_attention_available())
        fits = rank_context(config, layout, rank, need, machine.gpu_limit, **fit_kw)
    except (ValueError, OSError) as e:  # CheckpointError and the hub's errors are ValueErrors or OSErrors
        error = e
    _agree(error, group)
    contexts = [int(c) for c in _gather_floats(float(fits), group)]
    context = min(contexts) if max_context is None else max_context
    short = [r for r, c in enumerate(contexts) if c < max(context, MIN_CONTEXT)]
    if short:
        r = short[0]
        why = (f"its share does not fit its GPU limit of {limits[r]:.1f} GB even without context" if not contexts[r]
               else f"it can hold only {contexts[r]:,} tokens of context within its GPU limit of {limits[r]:.1f} GB")
        raise ParallelSetupError(f"rank {r} cannot run --parallel {mode}: {why}; `step35-mlx plan --hosts ...` "
                                 "shows what fits (--kv-bits 8 or a shorter --max-context may help)")
    try:
        set_wired_limit(rank_memory(config, layout, rank, need, context, **fit_kw))
        model = load_distributed(path, mode, group, split=list(counts) or None, mtp=mtp)
    except (ValueError, OSError) as e:
        error = e
    _agree(error, group)
    atexit.register(barrier, group)
    return RankModel(model, group, need, path, config, context)


def _agree(error: Exception | None, group: mx.distributed.Group) -> None:
    """Raise this rank's ``error``, or stop because another rank had one (every rank calls this)."""
    failed = [int(v) for v in _gather_floats(float(error is not None), group)]
    if error is not None:
        raise ParallelSetupError(str(error)) from None
    if any(failed):
        bad = ", ".join(str(r) for r, f in enumerate(failed) if f)
        raise ParallelSetupError(f"rank {bad} could not load its share (its error is in its own output); stopping")


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
