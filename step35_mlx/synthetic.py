"""Small random Step 3.5 Flash checkpoints in the real Hugging Face layout.

Used by the tests: :func:`tiny_config` builds a ``config.json`` dict with the
release's field names and structure (per-layer lists covering trunk + MTP
layers), :func:`random_hf_weights` draws float32 tensors under the release's
key names and shapes (fused 3-D experts, ``share_expert`` outside ``moe``,
MTP layers ``model.layers.{N..N+2}`` with ``transformer.shared_head``), and
:func:`write_hf_checkpoint` writes them as sharded safetensors plus
``model.safetensors.index.json``.

Norm weights are stored zero-centred (the model computes ``x * (1 + w)``), so
they are drawn around 0; a loader that forgets the +1 produces visibly wrong
outputs.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["tiny_config", "random_hf_weights", "write_hf_checkpoint", "text_config"]

_FULL = "full_attention"
_SLIDING = "sliding_attention"

# Default clamp values for the tiny model. They sit where the release has its
# clamps (routed: last two trunk layers, shared: last trunk layer) but are small
# enough to bind on a visible fraction of elements at the synthetic scales.
_TINY_ROUTED_LIMIT = 1.0
_TINY_SHARED_LIMIT = 1.5


def text_config(config: dict) -> dict:
    """Return the step3p5 text config (``text_config`` of a step3p7 wrapper, else ``config``)."""
    if "text_config" in config and isinstance(config["text_config"], dict):
        return config["text_config"]
    return config


def _per_layer_limits(
    override: Iterable[float] | None, default_trunk: list[float], num_layers: int, num_mtp: int
) -> list[float]:
    total = num_layers + num_mtp
    if override is None:
        return [float(x) for x in default_trunk] + [0.0] * num_mtp
    vals = [float(x) for x in override]
    if len(vals) == num_layers:
        return vals + [0.0] * num_mtp
    if len(vals) == total:
        return vals
    raise ValueError(
        f"swiglu limit list must have {num_layers} (trunk) or {total} (trunk + MTP) entries, got {len(vals)}"
    )


def tiny_config(
    *,
    hidden_size: int = 64,
    num_layers: int = 6,
    num_mtp: int = 3,
    vocab_size: int = 256,
    full_heads: int = 4,
    sliding_heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 96,
    num_experts: int = 8,
    top_k: int = 2,
    moe_intermediate_size: int = 32,
    share_expert_dim: int = 32,
    sliding_window: int = 8,
    full_layers: Iterable[int] | None = None,
    moe_layers: Iterable[int] | None = None,
    swiglu_limits: Iterable[float] | None = None,
    swiglu_limits_shared: Iterable[float] | None = None,
    rope_theta_full: float = 5e6,
    rope_theta_sliding: float = 1e4,
    partial_rotary_full: float = 0.5,
    partial_rotary_sliding: float = 1.0,
    original_max_position_embeddings: int = 8,
    rope_factor: float = 2.0,
    max_position_embeddings: int = 4096,
    model_type: str = "step3p5",
) -> dict:
    """Build a small ``config.json`` dict with the Step 3.5 Flash release's fields.

    Per-layer lists (``layer_types``, ``rope_theta``, ``partial_rotary_factors``,
    ``swiglu_limits``, ``swiglu_limits_shared``) have ``num_layers + num_mtp``
    entries like the release's 48-entry lists.

    - ``full_layers``: indices (over all ``num_layers + num_mtp`` layers) using full
      attention; default ``{i < num_layers : i % 4 == 0}`` (MTP layers sliding).
      ``rope_theta`` / ``partial_rotary_factors`` follow each layer's type.
    - ``moe_layers``: indices written to ``moe_layers_enum``; default
      ``1..num_layers-1``. An empty set gives ``use_moe: false`` and ``moe_layers_enum: ""``.
    - ``swiglu_limits`` / ``swiglu_limits_shared``: lists of ``num_layers`` (MTP
      entries padded with 0) or ``num_layers + num_mtp`` entries. Default: like the
      release's placement, routed limit 1.0 on the last two trunk layers and shared
      limit 1.5 on the last trunk layer (values that bind at the synthetic scales);
      pass zeros to disable.
    - ``model_type="step3p7"`` returns the Step 3.7 wrapper
      ``{"model_type": "step3p7", "architectures": [...], "text_config": {step3p5 dict}}``.

    ``max_position_embeddings`` also sets ``max_seq_len`` (the release has both, equal).

    ``rms_norm_eps`` is absent, as in the release (the model default is 1e-5).
    """
    if model_type not in ("step3p5", "step3p7"):
        raise ValueError(f"model_type must be 'step3p5' or 'step3p7', got {model_type!r}")
    if full_heads % kv_heads or sliding_heads % kv_heads:
        raise ValueError("head counts must be multiples of kv_heads")
    total = num_layers + num_mtp

    full = (
        {i for i in range(num_layers) if i % 4 == 0}
        if full_layers is None
        else {int(i) for i in full_layers}
    )
    layer_types = [_FULL if i in full else _SLIDING for i in range(total)]
    rope_theta = [float(rope_theta_full if t == _FULL else rope_theta_sliding) for t in layer_types]
    partial = [float(partial_rotary_full if t == _FULL else partial_rotary_sliding) for t in layer_types]

    moe = list(range(1, num_layers)) if moe_layers is None else sorted({int(i) for i in moe_layers})
    default_routed = [0.0] * num_layers
    default_shared = [0.0] * num_layers
    for i in range(max(0, num_layers - 2), num_layers):
        default_routed[i] = _TINY_ROUTED_LIMIT
    if num_layers:
        default_shared[num_layers - 1] = _TINY_SHARED_LIMIT
    limits = _per_layer_limits(swiglu_limits, default_routed, num_layers, num_mtp)
    limits_shared = _per_layer_limits(swiglu_limits_shared, default_shared, num_layers, num_mtp)

    max_pos = int(max_position_embeddings)
    cfg = {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": float(rope_factor),
            "original_max_position_embeddings": int(original_max_position_embeddings),
            "low_freq_factor": 1.0,
            "high_freq_factor": 32.0,
        },
        "yarn_only_types": [_FULL],
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "max_seq_len": max_pos,
        "vocab_size": vocab_size,
        "torch_dtype": "bfloat16",
        "use_qk_norm": True,
        "moe_layers_enum": ",".join(str(i) for i in moe),
        "num_attention_heads": full_heads,
        "num_attention_groups": kv_heads,
        "head_dim": head_dim,
        "use_moe": bool(moe),
        "moe_num_experts": num_experts,
        "moe_top_k": top_k,
        "moe_intermediate_size": moe_intermediate_size,
        "share_expert_dim": share_expert_dim,
        "moe_layer_offset": 0,
        "moe_every_n_layer": 1,
        "norm_expert_weight": True,
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": 3.0,
        "att_impl_type": "GQA",
        "tie_word_embeddings": False,
        "rope_theta": rope_theta,
        "use_head_wise_attn_gate": True,
        "sliding_window": sliding_window,
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "sink": False,
        "layer_types": layer_types,
        "use_rope_layers": [],
        "num_nextn_predict_layers": num_mtp,
        "partial_rotary_factors": partial,
        "eos_token_id": [1, 2],
        "bos_token_id": 0,
        "attention_other_setting": {
            "attention_type": _SLIDING,
            "num_attention_heads": sliding_heads,
            "num_attention_groups": kv_heads,
            "head_dim": head_dim,
            "true_head_dim": head_dim,
        },
        "swiglu_limits": limits,
        "swiglu_limits_shared": limits_shared,
        "zero_centered": True,
        "max_position_embeddings": max_pos,
    }
    if model_type == "step3p7":
        return {
            "model_type": "step3p7",
            "architectures": ["Step3p7ForConditionalGeneration"],
            "text_config": cfg,
        }
    return cfg


def _moe_layer_set(cfg: dict) -> set[int]:
    if not cfg.get("use_moe", True):
        return set()
    enum = cfg.get("moe_layers_enum")
    if enum is None:
        return set(range(1, cfg["num_hidden_layers"]))
    return {int(s) for s in str(enum).split(",") if s.strip()}


def _attn_dims(cfg: dict, layer: int) -> tuple[int, int, int]:
    """(q heads, kv heads, head_dim) of a layer."""
    types = cfg.get("layer_types")
    sliding = types[layer] == _SLIDING if types else layer % 2 == 0
    other = cfg.get("attention_other_setting")
    if sliding and other:
        return (
            other["num_attention_heads"],
            other["num_attention_groups"],
            other.get("head_dim", cfg["head_dim"]),
        )
    return cfg["num_attention_heads"], cfg["num_attention_groups"], cfg["head_dim"]


def _weight_shapes(cfg: dict, mtp: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) in a natural order; kind picks the init distribution."""
    H = cfg["hidden_size"]
    V = cfg["vocab_size"]
    n_trunk = cfg["num_hidden_layers"]
    n_mtp = cfg.get("num_nextn_predict_layers", 0) if mtp else 0
    moe = _moe_layer_set(cfg)
    E = cfg.get("moe_num_experts", 0)
    I_moe = cfg.get("moe_intermediate_size", 0)
    I_sh = cfg.get("share_expert_dim", I_moe)
    I = cfg["intermediate_size"]

    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (V, H), "embed")]
    for layer in range(n_trunk + n_mtp):
        p = f"model.layers.{layer}."
        if layer >= n_trunk:
            out += [
                (p + "enorm.weight", (H,), "norm"),
                (p + "hnorm.weight", (H,), "norm"),
                (p + "eh_proj.weight", (H, 2 * H), "linear"),
            ]
        nh, nkv, hd = _attn_dims(cfg, layer)
        out += [
            (p + "input_layernorm.weight", (H,), "norm"),
            (p + "self_attn.q_proj.weight", (nh * hd, H), "linear"),
            (p + "self_attn.k_proj.weight", (nkv * hd, H), "linear"),
            (p + "self_attn.v_proj.weight", (nkv * hd, H), "linear"),
            (p + "self_attn.o_proj.weight", (H, nh * hd), "linear"),
        ]
        if cfg.get("use_head_wise_attn_gate", True):
            out.append((p + "self_attn.g_proj.weight", (nh, H), "linear"))
        if cfg.get("use_qk_norm", True):
            out += [
                (p + "self_attn.q_norm.weight", (hd,), "norm"),
                (p + "self_attn.k_norm.weight", (hd,), "norm"),
            ]
        out.append((p + "post_attention_layernorm.weight", (H,), "norm"))
        if layer in moe:
            out += [
                (p + "moe.gate.weight", (E, H), "linear"),
                (p + "moe.router_bias", (E,), "router_bias"),
                (p + "moe.gate_proj.weight", (E, I_moe, H), "linear"),
                (p + "moe.up_proj.weight", (E, I_moe, H), "linear"),
                (p + "moe.down_proj.weight", (E, H, I_moe), "linear"),
                (p + "share_expert.gate_proj.weight", (I_sh, H), "linear"),
                (p + "share_expert.up_proj.weight", (I_sh, H), "linear"),
                (p + "share_expert.down_proj.weight", (H, I_sh), "linear"),
            ]
        else:
            out += [
                (p + "mlp.gate_proj.weight", (I, H), "linear"),
                (p + "mlp.up_proj.weight", (I, H), "linear"),
                (p + "mlp.down_proj.weight", (H, I), "linear"),
            ]
        if layer >= n_trunk:
            out += [
                (p + "transformer.shared_head.norm.weight", (H,), "norm"),
                (p + "transformer.shared_head.output.weight", (V, H), "linear"),
            ]
    out += [("model.norm.weight", (H,), "norm"), ("lm_head.weight", (V, H), "linear")]
    return out


def random_hf_weights(config: dict, *, seed: int = 0, mtp: bool = True) -> dict[str, np.ndarray]:
    """Draw float32 weights for ``config`` under the release's HF key names and shapes.

    Linear weights ``[out, in]`` (and fused experts ``[E, out, in]``) ~ N(0, 1/fan_in);
    norm weights ~ N(0, 0.2^2) (zero-centred); ``moe.router_bias`` ~ N(0, 0.5^2);
    embedding ~ N(0, 1). Each tensor is drawn from its own stream seeded by
    ``(seed, crc32(key))``, so a tensor does not change when other parts of the
    config (or ``mtp``) change. ``mtp=False`` omits the MTP layers.
    Accepts a step3p7 wrapper config (uses ``text_config``).
    """
    cfg = text_config(config)
    weights: dict[str, np.ndarray] = {}
    for key, shape, kind in _weight_shapes(cfg, mtp):
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        x = rng.standard_normal(shape, dtype=np.float32)
        if kind == "linear":
            x *= np.float32(1.0 / np.sqrt(shape[-1]))
        elif kind == "norm":
            x *= np.float32(0.2)
        elif kind == "router_bias":
            x *= np.float32(0.5)
        weights[key] = x
    return weights


def _natural_key(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _rename(key: str, prefix: str) -> str:
    if key.startswith("model."):
        return prefix + key[len("model.") :]
    return key


def write_hf_checkpoint(
    path: str | Path,
    config: dict,
    weights: dict[str, np.ndarray] | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
    num_shards: int = 3,
    key_prefix: str | None = None,
) -> dict[str, np.ndarray]:
    """Write ``config.json``, sharded safetensors and ``model.safetensors.index.json``.

    ``weights`` default to ``random_hf_weights(config, seed=seed)``. Tensors are
    sorted by key (numeric parts compared as numbers, so a layer's tensors stay
    together) and split into ``num_shards`` contiguous, non-empty, roughly
    equal-byte shards ``model-0000K-of-0000N.safetensors`` (fewer if there are
    fewer tensors). ``dtype`` is ``"float32"`` or ``"bfloat16"``; ``moe.router_bias``
    is always stored float32, as in the release. ``config.json`` is written as given.

    ``key_prefix`` replaces the leading ``model.`` of every key under ``model.``
    (``lm_head.weight`` is kept); default ``"model."``, or ``"model.language_model."``
    when ``config["model_type"] == "step3p7"``.

    Returns float32 numpy weights exactly as stored (after bf16 rounding), under the
    original ``model.``-style names.
    """
    import mlx.core as mx

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    if weights is None:
        weights = random_hf_weights(config, seed=seed)
    if key_prefix is None:
        key_prefix = "model.language_model." if config.get("model_type") == "step3p7" else "model."
    mx_dtype = mx.bfloat16 if dtype == "bfloat16" else mx.float32

    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "config.json", "w") as f:
        json.dump(config, f, indent=2)

    keys = sorted(weights, key=_natural_key)
    stored: dict[str, np.ndarray] = {}
    arrays: dict[str, "mx.array"] = {}
    for k in keys:
        a = mx.array(np.asarray(weights[k], dtype=np.float32))
        if not k.endswith("router_bias"):
            a = a.astype(mx_dtype)
        arrays[k] = a
        stored[k] = np.array(a.astype(mx.float32))

    # Contiguous split by cumulative bytes; every shard gets at least one tensor.
    n = min(num_shards, len(keys))
    sizes = [arrays[k].nbytes for k in keys]
    total = sum(sizes)
    bounds = [0]
    cum = 0
    for i, s in enumerate(sizes):
        cum += s
        shard_idx = len(bounds)  # shard being filled is shard_idx - 1
        remaining_keys = len(keys) - (i + 1)
        remaining_shards = n - shard_idx
        if shard_idx < n and (
            cum >= total * shard_idx / n or remaining_keys == remaining_shards
        ):
            bounds.append(i + 1)
    bounds.append(len(keys))
    assert len(bounds) == n + 1 and all(a < b for a, b in zip(bounds, bounds[1:]))

    weight_map: dict[str, str] = {}
    for s in range(n):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        shard = {}
        for k in keys[bounds[s] : bounds[s + 1]]:
            name = _rename(k, key_prefix)
            shard[name] = arrays[k]
            weight_map[name] = fname
        mx.save_safetensors(str(out_dir / fname), shard, metadata={"format": "pt"})

    index = {"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(out_dir / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)
    return stored
