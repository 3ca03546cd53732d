"""KV cache arithmetic: bytes per token and layer, and what each layer's cache holds for a context."""

from __future__ import annotations

from ..config import ModelConfig

KV_STEP = 256  # KVCache grows in steps of this many positions (cache.KVCache.step)
DEFAULT_SLACK = 8  # model.DEFAULT_SLACK: extra ring slots for exact rollback


def kv_token_bytes(kv_heads: int, head_dim: int, kv_bits: int | None = None, group_size: int = 64,
                   activation_dtype_bytes: int = 2) -> int:
    """Bytes one token takes in one layer's cache: K and V, float or quantized (packed + scale + bias per group)."""
    if kv_bits is None:
        per_head = head_dim * activation_dtype_bytes
    else:
        if head_dim % group_size:
            raise ValueError(f"head dim {head_dim} is not a multiple of the kv group size {group_size}")
        per_head = head_dim * kv_bits // 8 + 2 * (head_dim // group_size) * activation_dtype_bytes
    return 2 * kv_heads * per_head


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def layer_specs(cfg: ModelConfig) -> tuple[list, list, list]:
    """(full trunk layers, sliding trunk layers, MTP layers) as LayerSpecs (cached on the config)."""
    key = (cfg.num_hidden_layers, cfg.num_nextn_predict_layers, tuple(cfg.layer_types))
    cached = cfg.__dict__.get("_plan_layers")
    if cached is not None and cached[0] == key:
        return cached[1]
    trunk = [cfg.layer(i) for i in range(cfg.num_hidden_layers)]
    mtp = [cfg.layer(cfg.num_hidden_layers + j) for j in range(cfg.num_nextn_predict_layers)]
    out = ([s for s in trunk if not s.is_sliding], [s for s in trunk if s.is_sliding], mtp)
    cfg.__dict__["_plan_layers"] = (key, out)
    return out


def cache_bytes(spec, context: int, kv_bits, group, act, slack, window) -> int:
    tok = kv_token_bytes(spec.num_kv_heads, spec.head_dim, kv_bits, group, act)
    if spec.is_sliding:
        return tok * (window + slack)
    return tok * round_up(context, KV_STEP) if context > 0 else 0
