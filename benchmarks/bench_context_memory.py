"""Peak memory against context length, KV cache float / 8-bit / 4-bit, measured vs the planner.

Builds the context by chunked prefill with the real model code (``decode.prefill``, one
``prefill_step`` chunk at a time) on a small model: on a GPU the bundled demo model
(``step35_mlx/demo/model``: bf16 q4, head dim 32 so KV groups of 32, 4K positions -- longer
contexts measure memory only); on CPU, or with ``--model synthetic``, a synthetic Step
3.5-layout checkpoint with 2 full-attention and 4 sliding layers, head dim 64 (64-groups),
window 512 and a 128K position limit, in float32 (MLX's CPU kernels are several times
slower in bf16, which would put 16K past 5 minutes on 2 cores). At each context (1K, 2K,
4K, ... doubling up to --max-context) it prints, per KV format:

* the full-layer caches' ``nbytes`` and bytes per token, next to the planner's figure
  (``plan.plan_memory``; the caches grow in steps of 256 positions, so at these contexts
  the two are equal to the byte);
* the sliding rings' ``nbytes`` (flat: window + slack slots, whatever the context);
* the peak MLX memory (``mx.get_peak_memory``) over the last prefill chunk, minus the
  weights, next to the planner's KV + activations for that chunk.

    python benchmarks/bench_context_memory.py                   # 1K..16K, about 4 minutes on 2 CPU cores
    python benchmarks/bench_context_memory.py --max-context 64K # quick on a Mac GPU; ~1 h on 2 CPU cores
    python benchmarks/bench_context_memory.py --model demo --max-context 4K --kv-bits none,8

The sliding part must stay flat and the full part grow linearly at the planned bytes per
token; the activation column checks the planner's transient estimate (on CPU MLX runs
attention unfused, so the planner is asked for the unfused figure there).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from step35_mlx import plan as P  # noqa: E402
from step35_mlx.decode import new_cache, prefill  # noqa: E402
from step35_mlx.hub import DEMO_DIR  # noqa: E402
from step35_mlx.loader import load_model  # noqa: E402
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint  # noqa: E402


def bench_config() -> dict:
    cfg = tiny_config(
        hidden_size=128, num_layers=6, num_mtp=0, vocab_size=512, full_heads=2, sliding_heads=2, kv_heads=1,
        head_dim=64, intermediate_size=256, num_experts=4, top_k=2, moe_intermediate_size=64,
        share_expert_dim=64, sliding_window=512, full_layers={0, 3},
    )
    cfg["max_position_embeddings"] = cfg["max_seq_len"] = 131072
    return cfg


def get_model(name: str | None, workdir: Path):
    """``demo``, ``synthetic`` or a folder; default: the demo model on a GPU, the synthetic one on CPU."""
    demo = (DEMO_DIR / "config.json").is_file()
    if name is None:
        name = "demo" if demo and P.fused_attention_available() else "synthetic"
    if name == "demo":
        if not demo:
            sys.exit(f"the demo model is not installed ({DEMO_DIR})")
        folder = DEMO_DIR
    elif name == "synthetic":
        folder = workdir / "synthetic"
        # float32: MLX's CPU kernels for bf16 quantized matmuls are several times slower
        write_hf_checkpoint(folder, bench_config(), dtype="float32", num_shards=1)
    else:
        folder = Path(name)
    return folder, load_model(folder)


def mb(n: float) -> str:
    return f"{n / 1e6:8.2f}"


def run(model, folder: Path, contexts: list[int], kv_bits: list, step: int) -> list[dict]:
    cfg = model.config
    act = P.folder_activation_bytes(folder)
    fused = P.fused_attention_available()
    weights = P.folder_weight_sizes(folder)
    vocab = cfg.vocab_size
    rows = []
    mx.random.seed(0)
    tokens = mx.random.randint(0, vocab, (max(contexts),)).astype(mx.int32)
    full_idx = [i for i, l in enumerate(model.layers) if not l.is_sliding]
    for bits in kv_bits:
        mx.clear_cache()
        base_active = mx.get_active_memory()
        cache = new_cache(model, bits)  # group 64, or 32 when 64 does not divide the head dims
        group = cache[0].group_size
        done = 0
        t0 = time.perf_counter()
        for ctx in contexts:
            while done < ctx:
                n = min(step, ctx - done)
                last = done + n >= ctx
                if last:
                    mx.reset_peak_memory()
                prefill(model, cache, tokens[done:done + n], prefill_step=step)
                done += n
            peak = mx.get_peak_memory() - base_active
            full = sum(cache[i].nbytes for i in full_idx)
            sliding = sum(c.nbytes for i, c in enumerate(cache) if i not in full_idx)
            p = P.plan_memory(cfg, recipe=weights, context=ctx, kv_bits=bits, kv_group_size=group, mtp=False,
                              prefill_step=step, activation_dtype_bytes=act, fused_attention=fused, overhead=0)
            rows.append({
                "kv": "float" if bits is None else f"{bits}-bit", "context": ctx,
                "full": full, "full_plan": p.full_kv, "per_token": full / ctx, "per_token_plan": p.full_kv_per_token,
                "sliding": sliding, "sliding_plan": p.sliding_kv, "peak_over_weights": peak,
                "plan_kv_act": p.full_kv + p.sliding_kv + p.activations, "activations_plan": p.activations,
                "seconds": time.perf_counter() - t0,
            })
            r = rows[-1]
            print(f"{r['kv']:>6} {ctx:>7,} | {mb(full)} {mb(p.full_kv)} | {r['per_token']:9.1f} "
                  f"{r['per_token_plan']:9,} | {mb(sliding)} {mb(p.sliding_kv)} | {mb(peak)} {mb(r['plan_kv_act'])} "
                  f"{peak / r['plan_kv_act']:6.2f} | {r['seconds']:6.1f}", flush=True)
        del cache
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="demo, synthetic or a model folder (default: demo on a GPU, synthetic on CPU)")
    ap.add_argument("--max-context", default="16K", help="largest context, e.g. 16K or 64K (default 16K)")
    ap.add_argument("--min-context", default="1K")
    ap.add_argument("--kv-bits", default="none,8,4", help="comma-separated: none, 8, 4")
    ap.add_argument("--prefill-step", type=int, default=512)
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args()
    lo, hi = P.parse_tokens(args.min_context), P.parse_tokens(args.max_context)
    contexts = []
    c = lo
    while c <= hi:
        contexts.append(c)
        c *= 2
    bits = [P.parse_kv_bits(b) for b in args.kv_bits.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder, model = get_model(args.model, Path(tmp))
        cfg = model.config
        if max(contexts) > cfg.max_position_embeddings:
            print(f"note: contexts past the model's {cfg.max_position_embeddings} positions measure memory only "
                  "(RoPE runs at any position; generate/chat would refuse them)")
        n_full = sum(not l.is_sliding for l in model.layers)
        print(f"model: {'synthetic (bench_config)' if folder.name == 'synthetic' else folder} ({n_full} full + {len(model.layers) - n_full} sliding layers, window "
              f"{cfg.sliding_window}, head dim {cfg.head_dim}); device {mx.default_device()}; "
              f"prefill step {args.prefill_step}; attention {'fused' if P.fused_attention_available() else 'unfused'}")
        print("    KV context |  full KV MB: meas     plan |  B/token: meas      plan | sliding MB: meas   plan "
              "| peak-weights MB: meas plan(KV+act) ratio | s")
        rows = run(model, folder, contexts, bits, args.prefill_step)
    for kv in sorted({r["kv"] for r in rows}):
        rs = [r for r in rows if r["kv"] == kv]
        slope = (rs[-1]["full"] - rs[0]["full"]) / (rs[-1]["context"] - rs[0]["context"]) if len(rs) > 1 else 0
        flat = len({r["sliding"] for r in rs}) == 1
        exact = all(r["full"] == r["full_plan"] and r["sliding"] == r["sliding_plan"] for r in rs)
        print(f"{kv:>6}: full KV grows {slope:,.1f} B/token (plan {rs[0]['per_token_plan']:,}); sliding "
              f"{'flat' if flat else 'NOT flat'} at {rs[0]['sliding']:,} B; caches equal the plan: {exact}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
