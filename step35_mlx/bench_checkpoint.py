"""A tiny-to-bench-sized random Step 3.5 checkpoint, 4-bit, that both this project and mlx-lm load.

Release layout and field names with smaller dimensions, quantized once (4-bit g64 affine;
the MoE router 8-bit g64, as mlx-lm's ``quant_predicate`` does) and written as ONE
safetensors file under the Hugging Face key names with zero-centred norm weights.
``config.json``'s ``quantization`` block names the 8-bit router under both projects' module
paths. Used by ``benchmarks/bench_vs_mlx_lm.py`` and ``step35-mlx bench --vs-mlx-lm`` tests.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx


@dataclass
class BenchShape:
    """Dimensions of the synthetic model (attribute names as ``bench_vs_mlx_lm.py``'s options)."""

    hidden: int = 1024
    layers: int = 8
    kv_heads: int = 2
    experts: int = 64
    top_k: int = 8
    vocab: int = 32000
    window: int = 256


FULL, SLIDING = "full_attention", "sliding_attention"
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- config


def bench_config(args: BenchShape) -> dict:
    """config.json in the release's field names (per-layer arrays over trunk + MTP = trunk here)."""
    n = args.layers
    types = [FULL if i % 4 == 0 else SLIDING for i in range(n)]
    # Clamps where the release has them: routed on the last two trunk layers, shared on the last.
    limits = [0.0] * n
    limits_shared = [0.0] * n
    limits[-2:] = [7.0, 7.0]
    limits_shared[-1] = 16.0
    q = {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
    }
    for i in range(1, n):
        q[f"model.layers.{i}.moe.gate"] = {"group_size": 64, "bits": 8}  # ours
        q[f"model.layers.{i}.mlp.gate.gate"] = {"group_size": 64, "bits": 8}  # mlx-lm
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 2.0,
            "original_max_position_embeddings": 131072,
            "low_freq_factor": 1.0,
            "high_freq_factor": 32.0,
        },
        "yarn_only_types": [FULL],
        "hidden_size": args.hidden,
        "intermediate_size": 2816,
        "num_hidden_layers": n,
        "vocab_size": args.vocab,
        "use_qk_norm": True,
        "moe_layers_enum": ",".join(str(i) for i in range(1, n)),
        "num_attention_heads": 8,
        "num_attention_groups": args.kv_heads,
        "head_dim": 128,
        "use_moe": True,
        "moe_num_experts": args.experts,
        "moe_top_k": args.top_k,
        "moe_intermediate_size": 512,
        "share_expert_dim": 512,
        "norm_expert_weight": True,
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": 3.0,
        "tie_word_embeddings": False,
        "rope_theta": [5e6 if t == FULL else 1e4 for t in types],
        "use_head_wise_attn_gate": True,
        "sliding_window": args.window,
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "sink": False,
        "layer_types": types,
        "num_nextn_predict_layers": 0,
        "partial_rotary_factors": [0.5 if t == FULL else 1.0 for t in types],
        "eos_token_id": [1, 2],
        "bos_token_id": 0,
        "attention_other_setting": {
            "attention_type": SLIDING,
            "num_attention_heads": 12,
            "num_attention_groups": args.kv_heads,
            "head_dim": 128,
            "true_head_dim": 128,
        },
        "swiglu_limits": limits,
        "swiglu_limits_shared": limits_shared,
        "zero_centered": True,
        "max_position_embeddings": 262144,
        "quantization": q,
    }


def hf_tensors(cfg: dict):
    """(HF key, shape, kind) for the trunk, in the release's key names (architecture doc §4.1)."""
    H, V, E = cfg["hidden_size"], cfg["vocab_size"], cfg["moe_num_experts"]
    I, Im, Is = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["share_expert_dim"]
    moe = {int(i) for i in cfg["moe_layers_enum"].split(",")}
    yield "model.embed_tokens.weight", (V, H), "embed"
    for i, t in enumerate(cfg["layer_types"]):
        other = cfg["attention_other_setting"]
        nh = other["num_attention_heads"] if t == SLIDING else cfg["num_attention_heads"]
        nkv = other["num_attention_groups"] if t == SLIDING else cfg["num_attention_groups"]
        hd = cfg["head_dim"]
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (H,), "norm"
        yield p + "post_attention_layernorm.weight", (H,), "norm"
        yield p + "self_attn.q_proj.weight", (nh * hd, H), "linear"
        yield p + "self_attn.k_proj.weight", (nkv * hd, H), "linear"
        yield p + "self_attn.v_proj.weight", (nkv * hd, H), "linear"
        yield p + "self_attn.o_proj.weight", (H, nh * hd), "linear"
        yield p + "self_attn.g_proj.weight", (nh, H), "linear"
        yield p + "self_attn.q_norm.weight", (hd,), "norm"
        yield p + "self_attn.k_norm.weight", (hd,), "norm"
        if i in moe:
            yield p + "moe.gate.weight", (E, H), "router"
            yield p + "moe.router_bias", (E,), "router_bias"
            yield p + "moe.gate_proj.weight", (E, Im, H), "linear"
            yield p + "moe.up_proj.weight", (E, Im, H), "linear"
            yield p + "moe.down_proj.weight", (E, H, Im), "linear"
            yield p + "share_expert.gate_proj.weight", (Is, H), "linear"
            yield p + "share_expert.up_proj.weight", (Is, H), "linear"
            yield p + "share_expert.down_proj.weight", (H, Is), "linear"
        else:
            yield p + "mlp.gate_proj.weight", (I, H), "linear"
            yield p + "mlp.up_proj.weight", (I, H), "linear"
            yield p + "mlp.down_proj.weight", (H, I), "linear"
    yield "model.norm.weight", (H,), "norm"
    yield "lm_head.weight", (V, H), "linear"


def write_checkpoint(path: Path, cfg: dict, seed: int) -> tuple[int, bool]:
    """Draw float32 weights, quantize them once, write one HF-named safetensors file + config.json.

    Norm weights ~ N(0, 0.1^2) (zero-centred), router_bias ~ N(0, 0.05^2); matrices are
    uniform with std 1/sqrt(fan_in) (embedding std 1): uniform draws are 3x faster than
    normal ones on the CPU and the distribution does not matter for timing or agreement.
    Reuses ``path`` when it already holds this exact config (``--workdir``).
    Returns (float parameter count, reused).
    """
    n_params = sum(math.prod(shape) for _, shape, _ in hf_tensors(cfg))
    cfg_file, st_file = path / "config.json", path / "model.safetensors"
    if cfg_file.exists() and st_file.exists() and json.loads(cfg_file.read_text()) == {**cfg, "bench_seed": seed}:
        return n_params, True
    path.mkdir(parents=True, exist_ok=True)
    key = mx.random.key(seed)
    out: dict[str, mx.array] = {}
    for name, shape, kind in hf_tensors(cfg):
        key, sub = mx.random.split(key)
        if kind == "norm":
            out[name] = 0.1 * mx.random.normal(shape, key=sub)  # the model multiplies by (1 + w)
        elif kind == "router_bias":
            out[name] = 0.05 * mx.random.normal(shape, key=sub)
        else:
            a = math.sqrt(3.0) * (1.0 if kind == "embed" else shape[-1] ** -0.5)
            x = mx.random.uniform(-a, a, shape, key=sub)
            bits = 8 if kind == "router" else 4
            w, s, b = mx.quantize(x, group_size=64, bits=bits, mode="affine")
            stem = name[: -len(".weight")]
            out[stem + ".weight"], out[stem + ".scales"], out[stem + ".biases"] = w, s, b
        mx.eval(list(out.values()))
    mx.save_safetensors(str(st_file), out, metadata={"format": "mlx"})
    cfg_file.write_text(json.dumps({**cfg, "bench_seed": seed}, indent=1))
    del out
    gc.collect()
    return n_params, False
