"""The check before loading a folder: does it fit this machine, and with what context."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..mlx_lm_format import FolderFormat, read_folder
from .fit import check_fit
from .machine import MachineMemory, fused_attention_available, machine_memory, set_wired_limit
from .memory_plan import MemoryPlan, max_context, plan_memory
from .weights import folder_activation_bytes, folder_weight_sizes, load_dtype_bytes

MIN_CONTEXT = 4096  # the shortest context an automatic limit may pick before refusing to load


def _kv_group(cfg: ModelConfig, kv_bits: int | None, kv_group_size: int | None) -> int:
    """``decode.new_cache``'s rule: 64, or 32 when 64 does not divide every head dim."""
    if kv_group_size is not None:
        return kv_group_size
    if kv_bits is None:
        return 64
    dims = {cfg.head_dim, cfg.sliding_head_dim or cfg.head_dim}
    return 64 if all(d % 64 == 0 for d in dims) else 32


def preflight(path: str | Path, *, context: int | None = None, kv_bits: int | None = None,
              kv_group_size: int | None = None, mtp: bool = True, prefill_step: int = 512,
              machine: MachineMemory | None = None, min_context: int = MIN_CONTEXT,
              wire: bool = True, dtype_bytes: int | None | str = "auto",
              folder_format: FolderFormat | None = None, prefix_cache: int = 0) -> MemoryPlan:
    """Check, before loading ``path``, that it fits this machine (or ``machine``); return the plan.

    Weights come from the folder's safetensors headers, at the float width the loader will
    use (``dtype_bytes``; ``"auto"``: :func:`load_dtype_bytes`). With ``context`` ``None`` the plan
    takes the longest context that fits (at most the model's maximum); the caller should
    use ``plan.context`` as its context limit. Raises :class:`InsufficientMemoryError` (a
    ``ValueError``, with the options) when the requested context -- or, automatically, not
    even ``min_context`` tokens -- fits. On macOS with Metal it then wires the planned bytes
    (:func:`set_wired_limit`; ``wire=False`` skips that). ``folder_format``: the folder's
    :func:`~step35_mlx.mlx_lm_format.read_folder` reading when the caller already has it.
    ``prefix_cache``: the prefix cache's RAM budget in bytes, counted like the rest.
    """
    path = Path(path)
    folder = folder_format or read_folder(path)
    cfg = folder.config
    machine = machine or machine_memory()
    cap = cfg.max_position_embeddings
    # the same messages as settings.resolve_settings / decode.new_cache, which would refuse these later
    if context is not None and context > cap:
        raise ValueError(f"max_context {context} is larger than the model's {cap} positions")
    if context is not None and context < 1:
        raise ValueError(f"max_context must be >= 1, got {context}")
    if kv_bits not in (None, 4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    db = load_dtype_bytes() if dtype_bytes == "auto" else dtype_bytes
    kw = dict(recipe=folder_weight_sizes(path, db, folder_format=folder), kv_bits=kv_bits,
              kv_group_size=_kv_group(cfg, kv_bits, kv_group_size), mtp=mtp, prefill_step=prefill_step,
              activation_dtype_bytes=folder_activation_bytes(path, db), fused_attention=fused_attention_available(),
              prefix_cache=prefix_cache)
    if context is None:
        floor = plan_memory(cfg, context=min(min_context, cap), **kw)
        check_fit(floor, machine)
        context = max_context(floor, machine.gpu_limit)
    plan = plan_memory(cfg, context=context, **kw)
    check_fit(plan, machine)
    if wire:
        set_wired_limit(plan.total)
    return plan
