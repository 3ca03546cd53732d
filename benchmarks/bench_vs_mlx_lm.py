#!/usr/bin/env python3
"""Benchmark step35_mlx against mlx-lm's ``step3p5`` on identical weights, in one process.

A bench-sized random Step 3.5 model (release layout and field names, smaller
dimensions) is quantized once (4-bit g64 affine; the MoE router 8-bit g64, as
mlx-lm's ``quant_predicate`` does) and written as ONE safetensors file under
the Hugging Face key names with zero-centred norm weights. Both projects load
that same folder through their own loaders:

* ours:   ``step35_mlx.load_model(dir, dtype=mx.float32)`` (norms stay
  zero-centred; the +1 happens at run time),
* mlx-lm: ``mlx_lm.utils.load_model(dir)`` (its ``sanitize`` renames the MoE keys
  and folds the +1 into the norm weights of a vanilla checkpoint).

``config.json``'s ``quantization`` block names the 8-bit router under both
projects' module paths (``model.layers.N.moe.gate`` for us,
``model.layers.N.mlp.gate.gate`` for mlx-lm); each loader ignores the other's.

Before timing, both models must agree on logits (uncached forward on a short
prompt, and the cached prefill of the benchmark prompt); then, interleaved
(ours, mlx-lm, ours, mlx-lm, ...), after a warm-up:

* prefill: mlx-lm's ``generate_step`` protocol for both — the prompt minus its
  last token through the cache in chunks of ``--prefill-step`` (2048: one chunk
  here), ``mx.eval`` of the cache, then the last token -> logits -> argmax;
  tok/s = prompt length / wall time (time to first token),
* decode: ``--gen`` greedy steps, each step's argmax fed back, pipelined with
  ``mx.async_eval`` exactly like ``generate_step``; tok/s = gen / wall time,
* memory: ``mx.get_peak_memory()`` over each phase minus the active memory at
  the start of the run (both models live in this process), plus the model's own
  weight bytes: the peak the model would have when loaded alone.

Float32 activations on CPU (bf16 is 8-10x slower on MLX's CPU build).
Medians over ``--repeats``; ratios are ours / mlx-lm (>1 is better for tok/s,
<1 is better for memory).

    python benchmarks/bench_vs_mlx_lm.py            # ~4-5 min on 2 CPU cores
    python benchmarks/bench_vs_mlx_lm.py --quick    # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL, SLIDING = "full_attention", "sliding_attention"
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- config


def bench_config(args: argparse.Namespace) -> dict:
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


def write_checkpoint(path: Path, cfg: dict, seed: int) -> dict:
    """Draw float32 weights, quantize them once, write one HF-named safetensors file + config.json."""
    path.mkdir(parents=True, exist_ok=True)
    key = mx.random.key(seed)
    out: dict[str, mx.array] = {}
    stats = {"float_params": 0, "quantized_params": 0}
    for name, shape, kind in hf_tensors(cfg):
        key, sub = mx.random.split(key)
        x = mx.random.normal(shape, key=sub)
        stats["float_params"] += x.size
        if kind == "norm":
            out[name] = 0.1 * x  # zero-centred: the model multiplies by (1 + w)
        elif kind == "router_bias":
            out[name] = 0.05 * x
        else:
            if kind != "embed":
                x = x * shape[-1] ** -0.5
            bits = 8 if kind == "router" else 4
            w, s, b = mx.quantize(x, group_size=64, bits=bits, mode="affine")
            stem = name[: -len(".weight")]
            out[stem + ".weight"], out[stem + ".scales"], out[stem + ".biases"] = w, s, b
            stats["quantized_params"] += x.size
        mx.eval(list(out.values()))
    mx.save_safetensors(str(path / "model.safetensors"), out, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    del out
    gc.collect()
    return stats


# ----------------------------------------------------------------------------- models


def load_ours(path: Path):
    from step35_mlx import load_model

    return load_model(path, dtype=mx.float32)


def load_theirs(path: Path):
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    return model


def param_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def cache_arrays(cache) -> list:
    return [a for c in cache for a in (c.keys, c.values) if a is not None]


def prefill(model, prompt: mx.array, step: int):
    """mlx-lm ``generate_step`` prefill: all but the last token in chunks, eval the cache, then the last token."""
    cache = model.make_cache()
    rest = prompt
    while rest.shape[1] > 1:
        n = min(step, rest.shape[1] - 1)
        model(rest[:, :n], cache=cache)
        mx.eval(cache_arrays(cache))
        rest = rest[:, n:]
    logits = model(rest, cache=cache)[:, -1, :]
    y = mx.argmax(logits, axis=-1)
    mx.eval(y, logits)
    return cache, y, logits


def decode(model, cache, y: mx.array, n: int) -> list[int]:
    """``n`` greedy steps, pipelined like ``generate_step`` (build step i+1 before waiting on step i)."""

    def step(tok):
        return mx.argmax(model(tok[:, None], cache=cache)[:, -1, :], axis=-1)

    out = []
    nxt = step(y)
    mx.async_eval(nxt)
    for i in range(n):
        cur = nxt
        if i + 1 < n:
            nxt = step(cur)
            mx.async_eval(nxt)
        out.append(cur.item())
    return out


def measured_run(model, weights: int, prompt: mx.array, gen: int, step: int) -> dict:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    cache, y, _ = prefill(model, prompt, step)
    t1 = time.perf_counter()
    peak_prefill = mx.get_peak_memory() - base
    mx.reset_peak_memory()
    t2 = time.perf_counter()
    tokens = decode(model, cache, y, gen)
    t3 = time.perf_counter()
    peak_decode = mx.get_peak_memory() - base
    kv = sum(a.nbytes for a in cache_arrays(cache))
    del cache
    return {
        "prefill_tps": prompt.shape[1] / (t1 - t0),
        "decode_tps": gen / (t3 - t2),
        "peak_prefill": weights + peak_prefill,
        "peak_decode": weights + max(peak_prefill, peak_decode),
        "kv_bytes": kv,
        "tokens": [int(y.item())] + tokens,
    }


# ----------------------------------------------------------------------------- main


def rel_diff(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 128-token prompt, 16 decode tokens")
    ap.add_argument("--repeats", type=int, default=None, help="measured repeats per model (default 5; quick 2)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; quick 128)")
    ap.add_argument("--gen", type=int, default=None, help="decoded tokens (default 128; quick 16)")
    ap.add_argument("--window", type=int, default=256, help="sliding window (default 256 < prompt, so masks and ring wrap are exercised)")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prefill-step", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--tol", type=float, default=1e-4, help="max|diff|/max|logit| allowed before timing")
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    T = args.prompt or (128 if args.quick else 512)
    gen = args.gen or (16 if args.quick else 128)

    mx.set_default_device(mx.cpu)
    import mlx_lm

    cfg = bench_config(args)
    print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, device {mx.default_device()}, float32 activations")
    print(f"model: hidden {args.hidden}, {args.layers} layers "
          f"({''.join('F' if t == FULL else 'S' for t in cfg['layer_types'])}: full at i%4==0, "
          f"sliding window {args.window}), full 8 q heads / sliding 12 q heads, {args.kv_heads} kv heads, "
          f"head_dim 128; layer 0 dense (intermediate 2816), layers 1-{args.layers - 1} MoE "
          f"{args.experts} experts top-{args.top_k}, moe_intermediate 512, shared expert 512; vocab {args.vocab}")
    print("quantization: every Linear/Embedding/expert tensor 4-bit g64 affine (float32 scales/biases); "
          "MoE router 8-bit g64 in BOTH models (mlx-lm's quant_predicate choice); norms and router_bias float32")

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="step35_bench_")
        ckpt = Path(tmp.name)
    else:
        ckpt = args.workdir
    t = time.perf_counter()
    stats = write_checkpoint(ckpt, cfg, args.seed)
    print(f"checkpoint: {stats['float_params'] / 1e6:.1f} M params, "
          f"{(ckpt / 'model.safetensors').stat().st_size / MIB:.0f} MiB on disk ({time.perf_counter() - t:.1f} s)")

    models = {}
    weights = {}
    for name, loader in (("ours", load_ours), ("mlx-lm", load_theirs)):
        before = mx.get_active_memory()
        models[name] = loader(ckpt)
        mx.eval(models[name].parameters())
        weights[name] = param_bytes(models[name])
        print(f"loaded {name}: parameters {weights[name] / MIB:.1f} MiB "
              f"(active memory +{(mx.get_active_memory() - before) / MIB:.1f} MiB)")
    if tmp is not None:
        tmp.cleanup()

    # ---- consistency: uncached forward on a short prompt, then the cached prefill of the bench prompt
    key = mx.random.key(args.seed + 1)
    prompt = mx.random.randint(3, args.vocab, (1, T), key=key)
    short = prompt[:, :32]
    la, lb = models["ours"](short), models["mlx-lm"](short)
    r_short = rel_diff(la, lb)
    _, ya, la = prefill(models["ours"], prompt, args.prefill_step)
    _, yb, lb = prefill(models["mlx-lm"], prompt, args.prefill_step)
    r_prefill = rel_diff(la, lb)
    print(f"consistency: uncached 32-token forward max|diff|/max|logit| = {r_short:.2e}; "
          f"cached {T}-token prefill, last logits = {r_prefill:.2e} (tolerance {args.tol:g})")
    if max(r_short, r_prefill) > args.tol:
        print("the two models disagree; the timing comparison would be meaningless", file=sys.stderr)
        return 1

    # ---- warm-up (also compiles mlx-lm's mx.compile'd helpers)
    for name in models:
        measured_run(models[name], weights[name], prompt, min(gen, 8), args.prefill_step)

    # ---- measured, interleaved
    runs: dict[str, list[dict]] = {n: [] for n in models}
    t = time.perf_counter()
    for r in range(repeats):
        for name in models:
            runs[name].append(measured_run(models[name], weights[name], prompt, gen, args.prefill_step))
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(
            f"{n} prefill {runs[n][-1]['prefill_tps']:.1f} tok/s decode {runs[n][-1]['decode_tps']:.1f} tok/s"
            for n in models), flush=True)
    elapsed = time.perf_counter() - t

    same_tokens = runs["ours"][0]["tokens"] == runs["mlx-lm"][0]["tokens"]
    first_diff = next((i for i, (a, b) in enumerate(zip(runs["ours"][0]["tokens"], runs["mlx-lm"][0]["tokens"]))
                       if a != b), None)
    print(f"greedy tokens identical over {gen + 1} tokens: {same_tokens}"
          + ("" if same_tokens else f" (first difference at token {first_diff})"))

    def med(name, k):
        return statistics.median(r[k] for r in runs[name])

    def rng(name, k):
        v = [r[k] for r in runs[name]]
        return min(v), max(v)

    rows = [
        (f"prefill tok/s ({T}-token prompt)", "prefill_tps", 1, "{:.1f}"),
        (f"decode tok/s ({gen} tokens)", "decode_tps", 1, "{:.1f}"),
        ("peak memory, prefill (MiB)", "peak_prefill", MIB, "{:.1f}"),
        ("peak memory, prefill+decode (MiB)", "peak_decode", MIB, "{:.1f}"),
        ("KV cache at end (MiB)", "kv_bytes", MIB, "{:.2f}"),
    ]
    print()
    print(f"{'metric':<36} {'ours':>18} {'mlx-lm':>18} {'ours/mlx-lm':>12}")
    print("-" * 87)
    result = {}
    for label, k, div, fmt in rows:
        a, b = med("ours", k) / div, med("mlx-lm", k) / div
        lo_a, hi_a = (x / div for x in rng("ours", k))
        lo_b, hi_b = (x / div for x in rng("mlx-lm", k))
        cell_a = fmt.format(a) + (f" [{fmt.format(lo_a)}-{fmt.format(hi_a)}]" if k.endswith("tps") else "")
        cell_b = fmt.format(b) + (f" [{fmt.format(lo_b)}-{fmt.format(hi_b)}]" if k.endswith("tps") else "")
        print(f"{label:<36} {cell_a:>18} {cell_b:>18} {a / b:>11.3f}x")
        result[k] = {"ours": a, "mlx-lm": b, "ratio": a / b}
    wa, wb = weights["ours"] / MIB, weights["mlx-lm"] / MIB
    print(f"{'weights (MiB)':<36} {wa:>18.1f} {wb:>18.1f} {wa / wb:>11.3f}x")
    print("-" * 87)
    print(f"medians of {repeats} interleaved repeats [min-max]; peak memory = own weights + "
          f"(process peak - active memory at run start); measured phase took {elapsed:.0f} s")
    verdict = []
    verdict.append(f"prefill {result['prefill_tps']['ratio']:.2f}x")
    verdict.append(f"decode {result['decode_tps']['ratio']:.2f}x")
    verdict.append(f"peak memory {result['peak_decode']['ratio']:.3f}x")
    print("ours / mlx-lm: " + ", ".join(verdict))

    if args.json:
        args.json.write_text(json.dumps({
            "config": {k: v for k, v in cfg.items() if k != "quantization"},
            "prompt_tokens": T, "gen_tokens": gen, "repeats": repeats,
            "consistency": {"uncached_short": r_short, "cached_prefill": r_prefill, "same_tokens": same_tokens},
            "weights_bytes": weights, "results": result, "runs": runs,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
