"""Tensor parallelism: every rank holds a slice of every attention and FFN matrix.

Attention is split by heads (q/k/v/gate projections all-to-sharded, ``o_proj``
sharded-to-all, which sums over the group); dense MLP, shared expert and routed
experts are split along their intermediate dimension (each routed expert keeps all
its rows but a slice of its width), and the FFN's partial outputs are summed once per
layer (``DecoderLayer.ffn_group``). Router, norms, embedding, LM head and ``eh_proj``
stay whole on every rank. MTP layers are split the same way as trunk layers.

Built on ``mlx.nn.layers.distributed`` (``shard_linear`` / ``shard_inplace``).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear

# FFN projections whose input (intermediate) dimension is split: these need whole quantization groups.
_DOWN_PROJECTIONS = ("mlp.down_proj", "share_expert.down_proj", "moe.down_proj")


@dataclass(frozen=True)
class SplitProblem:
    """One matrix or head count that cannot be split across ``ranks`` ranks."""

    where: str
    what: str


def _in_width(module: nn.Module) -> int:
    w = module.weight
    bits = getattr(module, "bits", None)
    return w.shape[-1] * 32 // bits if bits else w.shape[-1]


def _sharded_layers(model) -> list[tuple[str, nn.Module]]:
    trunk = [(f"model.layers.{i}", l) for i, l in enumerate(model.layers)]
    return trunk + [(f"model.mtp.{j}", l) for j, l in enumerate(model.model.mtp)]


def tensor_split_problems(model, ranks: int) -> list[SplitProblem]:
    """Why ``model`` (full, possibly quantized) cannot be tensor-split ``ranks`` ways; empty when it can."""
    problems: list[SplitProblem] = []
    for name, layer in _sharded_layers(model):
        attn = layer.self_attn
        for label, count in (("attention heads", attn.num_heads), ("kv heads", attn.num_kv_heads)):
            if count % ranks:
                problems.append(SplitProblem(name, f"{count} {label} do not divide by {ranks}"))
        for path in ["self_attn.o_proj"] + [p for p in _DOWN_PROJECTIONS if _has(layer, p)]:
            mod = _get(layer, path)
            width = _in_width(mod)
            gs = getattr(mod, "group_size", None)
            if width % ranks:
                problems.append(SplitProblem(f"{name}.{path}", f"width {width} does not divide by {ranks}"))
            elif gs and (width // ranks) % gs:
                problems.append(SplitProblem(
                    f"{name}.{path}",
                    f"width {width} / {ranks} ranks = {width // ranks} is not a multiple of the quantization group {gs}",
                ))
    return problems


def tensor_rank_counts(model, up_to: int = 16) -> list[int]:
    """Rank counts in ``2..up_to`` that tensor parallelism can split ``model`` across."""
    return [n for n in range(2, up_to + 1) if not tensor_split_problems(model, n)]


def check_tensor_split(model, ranks: int) -> None:
    """Raise ``ValueError`` naming the first problems and the rank counts that work."""
    problems = tensor_split_problems(model, ranks)
    if not problems:
        return
    shown = "; ".join(f"{p.where}: {p.what}" for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    ok = tensor_rank_counts(model)
    hint = (f"tensor parallelism works with {', '.join(map(str, ok))} ranks" if ok
            else "no rank count up to 16 works for tensor parallelism")
    raise ValueError(
        f"cannot split this model across {ranks} ranks by tensor parallelism: {shown}{more}; "
        f"{hint}; --parallel expert or pipeline has no such limit"
    )


def _has(layer, path: str) -> bool:
    head = path.split(".")[0]
    return head in layer


def _get(layer, path: str) -> nn.Module:
    mod = layer
    for part in path.split("."):
        mod = mod[part] if isinstance(mod, dict) else getattr(mod, part)
    return mod


def shard_tensor(model, group: mx.distributed.Group) -> None:
    """Split ``model`` in place across ``group`` (see the module docstring); checks divisibility first."""
    n = group.size()
    check_tensor_split(model, n)
    for _, layer in _sharded_layers(model):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj") + (("g_proj",) if attn.gated else ()):
            setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.num_heads //= n
        attn.num_kv_heads //= n
        ffns = [layer.moe, layer.share_expert] if layer.is_moe else [layer.mlp]
        for ffn in ffns:
            shard_inplace(ffn.gate_proj, "all-to-sharded", group=group)
            shard_inplace(ffn.up_proj, "all-to-sharded", group=group)
            shard_inplace(ffn.down_proj, "sharded-to-all", group=group)
        layer.ffn_group = group
