"""MTP speculative decoding vs plain decoding on one model, in one run.

For plain decoding and draft depths 1..3 (interleaved repeats, median) it prints decode
tokens/s, acceptance per draft position, tokens per verify and weight bytes read per
generated token: the bandwidth proxy that decides decode speed on Apple GPUs. MLX's CPU
build multiplies quantized-matmul cost by the number of rows, so CPU wall-clock
understates what MTP gains on a Mac.

    python benchmarks/bench_mtp.py                       # bundled demo model, greedy
    python benchmarks/bench_mtp.py --model DIR --tokens 512 --temperature 1.0
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from step35_mlx import load
from step35_mlx.hub import resolve_model
from step35_mlx.sampling import SamplingParams
from step35_mlx.tune import TUNE_PROMPT, measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="model folder or 'demo' (default)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mtp-hidden", choices=["pre_norm", "post_norm"], default=None)
    args = ap.parse_args()

    model, tokenizer = load(resolve_model(args.model))
    if args.mtp_hidden:
        model.mtp_hidden = args.mtp_hidden
    prompt = tokenizer.encode(TUNE_PROMPT, add_special_tokens=False)
    results = measure(model, prompt, args.tokens, repeats=args.repeats,
                      params=SamplingParams(temperature=args.temperature))
    print(f"model {args.model}: prompt {len(prompt)} tokens, {args.tokens} generated, temperature "
          f"{args.temperature}, mtp_hidden {model.mtp_hidden}, device {mx.default_device()}, "
          f"median of {args.repeats}")
    print(f"{'mode':<10} {'tok/s':>8} {'x plain':>8} {'tok/verify':>10}  {'accept per position':<20} "
          f"{'MB/token':>9} {'x plain':>8}")
    base = results[0]
    for r in results:
        acc = " ".join(f"{a:.2f}" for a in r.acceptance) or "-"
        print(f"{r.mode:<10} {r.tokens_per_s:8.1f} {r.tokens_per_s / base.tokens_per_s:8.2f} "
              f"{r.tokens_per_verify:10.2f}  {acc:<20} {r.bytes_per_token / 1e6:9.3f} "
              f"{r.bytes_per_token / base.bytes_per_token:8.2f}")


if __name__ == "__main__":
    main()
