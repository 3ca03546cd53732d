"""MTP speculative decoding vs plain decoding on one model, in one run.

For AR and draft depths 1..3 it prints decode tokens/s, acceptance per draft position,
tokens per verify and weight bytes read per generated token (the bandwidth proxy that
decides speed on Apple GPUs; MLX's CPU build multiplies quantized-matmul cost by the
number of rows, so CPU wall-clock understates the gain).

    python benchmarks/bench_mtp.py                 # bundled demo model, greedy
    python benchmarks/bench_mtp.py --model DIR --tokens 512 --temperature 1.0
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from step35_mlx.costs import RoutingRecorder, decode_cost
from step35_mlx.sampling import SamplingParams, probs, sample
from step35_mlx.speculative import SpecStats, speculative_tokens

PROMPT = (
    "<|im_start|>user\nExplain what the `with` statement does in Python.<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n"
)


def ar_tokens(model, cache, prompt: mx.array, params: SamplingParams, key):
    """Plain decoding with the same sampling math as the speculative loop."""
    logits = model(prompt[None], cache=cache)[0, -1]
    while True:
        key, sub = mx.random.split(key)
        p = probs(logits, params)
        tok = int(mx.argmax(p).item()) if params.greedy else int(sample(p, key=sub).item())
        yield tok
        logits = model(mx.array([[tok]]), cache=cache)[0, -1]


def run(model, prompt, params, n_tokens, depth, seed):
    """Generate ``n_tokens``; returns (tokens, decode seconds, SpecStats or None, DecodeCost)."""
    cache = model.make_cache()
    stats = SpecStats(depth) if depth else None
    key = mx.random.key(seed)
    gen = (speculative_tokens(model, cache, prompt, params, depth=depth, key=key, stats=stats)
           if depth else ar_tokens(model, cache, prompt, params, key))
    out = []
    with RoutingRecorder(model) as rec:
        out.append(next(gen))  # prefill + first token, not timed
        rec.clear()
        t0 = time.perf_counter()
        for tok in gen:
            out.append(tok)
            if len(out) > n_tokens:
                break
        dt = time.perf_counter() - t0
        gen.close()
        forwards = rec.forwards()
        generated = len(out) - 1
        calls = [stats.verifies] * depth if depth else []
        cost = decode_cost(model, rec, generated, forwards, calls)
    return out, dt, stats, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="model folder or 'demo' (default)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mtp-hidden", choices=["pre_norm", "post_norm"], default=None)
    args = ap.parse_args()

    from step35_mlx import load
    from step35_mlx.hub import resolve_model

    model, tokenizer = load(resolve_model(args.model))
    if args.mtp_hidden:
        model.mtp_hidden = args.mtp_hidden
    prompt = mx.array(tokenizer.encode(PROMPT, add_special_tokens=False))
    params = SamplingParams(temperature=args.temperature)
    depths = [0] + list(range(1, min(3, model.num_mtp) + 1))
    results = {d: [] for d in depths}
    ref = None
    for r in range(args.repeats):
        for d in depths:
            out, dt, stats, cost = run(model, prompt, params, args.tokens, d, seed=r)
            if params.greedy:
                ref = ref or out
                assert out == ref, f"depth {d}: greedy MTP output differs from AR"
            results[d].append((dt, stats, cost))
    print(f"model {args.model}: prompt {prompt.size} tokens, {args.tokens} generated, "
          f"temperature {args.temperature}, mtp_hidden {model.mtp_hidden}, device {mx.default_device()}")
    print(f"{'mode':<6} {'tok/s':>8} {'x AR':>6} {'tok/verify':>10} {'accept per position':<22} {'MB/token':>9} {'x AR':>6}")
    base_tps = base_bytes = None
    for d in depths:
        dts = sorted(x[0] for x in results[d])
        dt = dts[len(dts) // 2]
        stats, cost = results[d][-1][1], results[d][-1][2]
        tps = cost.tokens / dt
        bpt = cost.per_token / 1e6
        base_tps = base_tps or tps
        base_bytes = base_bytes or bpt
        acc = " ".join(f"{a:.2f}" for a in stats.acceptance) if stats else "-"
        tpv = f"{stats.tokens_per_verify:.2f}" if stats else "1.00"
        name = f"d={d}" if d else "AR"
        print(f"{name:<6} {tps:8.1f} {tps / base_tps:6.2f} {tpv:>10} {acc:<22} {bpt:9.2f} {bpt / base_bytes:6.2f}")


if __name__ == "__main__":
    main()
