"""The largest transient working set of a forward: the last prefill chunk or an MTP verify step.

What each part counts is described in :mod:`step35_mlx.plan.memory_plan`.
"""

from __future__ import annotations

from ..config import ModelConfig
from .kv import DEFAULT_SLACK, KV_STEP, kv_token_bytes, layer_specs, round_up


def _score_bytes(kv_bits, act: int, fused: bool, rows: int) -> tuple[int, bool, bool]:
    """(bytes per attention score element, mask materialised?, K/V dequantized?) for a chunk of ``rows``."""
    dequant_rows = dequantize_prefill_rows()
    if kv_bits is not None and not (dequant_rows is not None and rows > dequant_rows):
        # quantized_sdpa: scores in the activation dtype, cast to float32 for the softmax
        # (in place afterwards), cast back; a float32 model skips the casts.
        return (4 if act == 4 else act + 4), True, False
    dequant = kv_bits is not None
    if fused:
        return 0, False, dequant
    return act, True, dequant


def dequantize_prefill_rows() -> int | None:
    from ..layers import attention

    rows = getattr(attention, "DEQUANTIZE_PREFILL_ROWS", None)
    return int(rows) if rows is not None else None


def _attention_bytes(spec, rows: int, keys: int, kv_bits, group, act, fused, grow_old: int) -> dict:
    Hq, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    sb, mask, dequant = _score_bytes(kv_bits, act, fused, rows)
    out = {
        "projections": rows * (2 * Hq + 4 * Hkv) * D * act + rows * Hq * act,
        "scores": Hq * rows * keys * sb,
        # a causal mask built inside the unfused kernels (the sliding mask is counted once per forward)
        "mask": rows * keys if mask and not spec.is_sliding else 0,
        "dequantized_kv": 2 * Hkv * D * keys * act if dequant else 0,
    }
    if spec.is_sliding:
        # ring contents in position order concatenated with the new rows (K and V)
        out["ring_concat"] = kv_token_bytes(Hkv, D, kv_bits, group, act) * keys
    else:
        out["kv_growth"] = grow_old
    return out


def _ffn_bytes(cfg: ModelConfig, rows: int, act: int) -> dict:
    H = cfg.hidden_size
    moe = dense = 0
    if cfg.moe_layers:
        tk = rows * cfg.moe_top_k
        moe = (tk * H * (2 * act + 4) + 3 * tk * cfg.moe_intermediate_size * act
               + rows * cfg.moe_num_experts * 12 + rows * H * 4 + 3 * rows * cfg.share_expert_dim * act)
    if len(cfg.moe_layers) < cfg.num_layers_total:
        dense = 3 * rows * cfg.intermediate_size * act
    return {"moe": moe, "dense_mlp": dense}


def activation_bytes(cfg: ModelConfig, context: int, *, prefill_step: int = 512, kv_bits=None,
                     kv_group_size: int = 64, activation_dtype_bytes: int = 2, batch: int = 1,
                     fused_attention: bool = True, mtp: bool = True, slack: int = DEFAULT_SLACK) -> dict:
    """Peak transient bytes (see the module docstring) and its breakdown, for the larger of the
    last prefill chunk and an MTP verify step. Keys: ``total``, ``phase``, ``rows`` and the parts."""
    act = activation_dtype_bytes
    window = cfg.sliding_window
    C = window + slack
    full, sliding, mtp_layers = layer_specs(cfg)
    n_mtp = len(mtp_layers) if mtp else 0
    best: dict | None = None
    decode_rows = n_mtp + 1  # one token, or an MTP verify of the pending token + n_mtp drafts
    phases = [("prefill", max(1, min(prefill_step, context)), 1),
              ("verify" if n_mtp else "decode", max(1, min(decode_rows, context)), decode_rows)]
    for phase, T, logit_rows in phases:
        before = max(context - T, 0)
        layer_parts = []
        for spec in ([full[0]] if full else []) + ([sliding[0]] if sliding else []) + mtp_layers[:n_mtp][:1]:
            if spec.is_sliding:
                keys = (min(before, C) + T) if not T <= slack + 1 else min(before + T, C)
                grow = 0
            else:
                keys = context
                tok = kv_token_bytes(spec.num_kv_heads, spec.head_dim, kv_bits, kv_group_size, act)
                old = round_up(before, KV_STEP) if before > 0 else 0
                grow = tok * old if round_up(context, KV_STEP) > old else 0
            parts = _attention_bytes(spec, T, keys, kv_bits, kv_group_size, act, fused_attention, grow)
            layer_parts.append((f"attention ({'sliding' if spec.is_sliding else 'full'})", parts))
        ffn = _ffn_bytes(cfg, T, act)
        layer_parts += [(f"ffn ({k})", {k: v}) for k, v in ffn.items() if v]
        biggest_name, biggest = max(layer_parts, key=lambda kv: sum(kv[1].values()))
        stream = 8 * T * cfg.hidden_size * act
        if sliding and T > 1:  # model._masks: one boolean window mask per forward, shared by sliding layers
            stream += T * ((min(before, C) + T) if T > slack + 1 else min(before + T, C))
        logits = logit_rows * cfg.vocab_size * (4 + act)
        total = batch * (stream + sum(biggest.values()) + logits)
        result = {"total": total, "phase": phase, "rows": T, "stream": batch * stream, "logits": batch * logits,
                  "largest_layer": biggest_name, **{k: batch * v for k, v in biggest.items()}}
        if best is None or total > best["total"]:
            best = result
    return best


def with_image_encoding(cfg: ModelConfig, acts: dict, act: int, fused_attention: bool) -> dict:
    """A Step 3.7 model encodes images one view at a time before their prefill chunk: the peak is the larger."""
    from ..vision.config import VisionConfig
    from ..vision.costs import view_cost

    vcfg = VisionConfig.from_config(cfg.raw)
    if vcfg is None:
        return acts
    view = view_cost(vcfg, vcfg.image_size, act, fused_attention)
    if view.activation_bytes <= acts["total"]:
        return acts
    return {"total": view.activation_bytes, "phase": "image encoding", "rows": view.patches,
            "largest_layer": f"vision encoder ({vcfg.image_size}x{vcfg.image_size} view)"}
