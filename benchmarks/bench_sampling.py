#!/usr/bin/env python3
"""Per-token sampling cost at the release's vocabulary (128,896): ours vs mlx-lm's samplers.

Each setting is timed as the work a decode step adds after the logits exist:

* ours: ``step35_mlx.sampling.sample_token(logits, params, key)`` (what ``decode.ar_tokens`` runs),
* mlx-lm: ``logits - logsumexp(logits)`` (``generate_step`` always does this) then
  ``mlx_lm.sample_utils.make_sampler(...)`` on the log-probabilities.

Settings: greedy; temperature 1 with top-k 50; top-p 0.95; min-p 0.05; top-k 50 + top-p 0.95.
(mlx-lm applies top-p / min-p to the log-probabilities before the temperature, we after it;
at temperature 1 both are the same distribution.) Logits are drawn fresh per repeat (N(0, 3^2)), one row, float32 (what our LM head
gives on the CPU) and bfloat16 (mlx-lm's default activations). The two samplers alternate call by
call so background load hits both alike; medians and [min-max] over ``--repeats`` calls.

    python benchmarks/bench_sampling.py               # ~1 min
    python benchmarks/bench_sampling.py --repeats 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step35_mlx.sampling import SamplingParams, sample_token  # noqa: E402

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "top-k 50": dict(temperature=1.0, top_k=50),
    "top-p 0.95": dict(temperature=1.0, top_p=0.95),
    "min-p 0.05": dict(temperature=1.0, min_p=0.05),
    "top-k 50 + top-p 0.95": dict(temperature=1.0, top_k=50, top_p=0.95),
}


def theirs(setting: dict):
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=setting["temperature"], top_p=setting.get("top_p", 0.0),
                           min_p=setting.get("min_p", 0.0), top_k=setting.get("top_k", 0))
    return lambda logits: sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def ours(setting: dict):
    params = SamplingParams(**setting)
    key = mx.random.key(0)

    def run(logits):
        nonlocal key
        key, sub = mx.random.split(key)
        return sample_token(logits, params, sub)

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128_896)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import mlx_lm

    dtype = getattr(mx, args.dtype)
    print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, device {mx.default_device()}, "
          f"vocab {args.vocab}, {args.dtype} logits, {args.repeats} alternating calls per sampler")
    print(f"{'setting':<24} {'ours ms':>20} {'mlx-lm ms':>20} {'ours/mlx-lm':>12}")
    out = {}
    for name, setting in SETTINGS.items():
        fns = {"ours": ours(setting), "mlx-lm": theirs(setting)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.repeats + 3):
            logits = (3.0 * mx.random.normal((1, args.vocab), key=mx.random.key(r))).astype(dtype)
            mx.eval(logits)
            for who in (fns if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                mx.eval(fns[who](logits))
                if r >= 3:
                    times[who].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cells = {k: f"{med[k]:.3f} [{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}]" for k, v in times.items()}
        print(f"{name:<24} {cells['ours']:>20} {cells['mlx-lm']:>20} {med['ours'] / med['mlx-lm']:>11.2f}x")
        out[name] = {"ours_ms": med["ours"], "mlx_lm_ms": med["mlx-lm"], "ratio": med["ours"] / med["mlx-lm"]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
