#!/usr/bin/env python3
"""Decode speed with one vs two CPU streams (``streams.use_two_streams``) on the bench-sized model.

The same synthetic 4-bit checkpoint as ``bench_vs_mlx_lm.py`` (hidden 1024, 8 layers, 64
experts top-8, vocab 32,000; ``--workdir`` keeps it). Greedy decode of ``--gen`` tokens after a
short prompt, the two modes alternating run by run; the greedy tokens and the last logits must
be identical. Prints medians and [min-max] tok/s and the ratio.

    python benchmarks/bench_streams.py                         # ~2 min on 2 idle cores
    taskset -c 0,1 python benchmarks/bench_streams.py          # pin to two cores on a bigger machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from step35_mlx.bench_checkpoint import BenchShape, bench_config, write_checkpoint  # noqa: E402
from step35_mlx.loader import load_model  # noqa: E402
from step35_mlx.streams import use_two_streams  # noqa: E402


def decode(model, n: int) -> tuple[list[int], mx.array, float]:
    cache = model.make_cache()
    logits = model(mx.arange(16, 48)[None], cache)[:, -1]
    y = mx.argmax(logits, axis=-1)
    mx.eval(y)
    out = []
    t0 = time.perf_counter()
    nxt = model(y[None], cache)[:, -1]
    mx.async_eval(nxt)
    for _ in range(n):
        logits = nxt
        y = mx.argmax(logits, axis=-1)
        nxt = model(y[None], cache)[:, -1]
        mx.async_eval(nxt)
        out.append(y.item())
    dt = time.perf_counter() - t0
    mx.eval(nxt)
    return out, logits, n / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="step35_streams_")
        args.workdir = Path(tmp.name)
    write_checkpoint(args.workdir, bench_config(BenchShape()), 0)
    model = load_model(args.workdir, dtype=mx.float32)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"mlx {mx.__version__}, {affinity} usable cores, load average {os.getloadavg()[0]:.1f}; "
          f"bench model, float32 activations, {args.gen} greedy tokens")
    res: dict[str, list[float]] = {"one stream": [], "two streams": []}
    ref = None
    decode(model, 4)
    for r in range(args.repeats):
        modes = list(res) if r % 2 == 0 else list(res)[::-1]
        for mode in modes:
            use_two_streams(model, mode == "two streams")
            toks, logits, tps = decode(model, args.gen)
            if ref is None:
                ref = (toks, logits)
            elif toks != ref[0] or not mx.array_equal(logits, ref[1]).item():
                print(f"{mode}: output differs from the first run", file=sys.stderr)
                return 1
            res[mode].append(tps)
    for mode, v in res.items():
        print(f"{mode:<12} {statistics.median(v):7.2f} tok/s [{min(v):.2f}-{max(v):.2f}]")
    print(f"two / one: {statistics.median(res['two streams']) / statistics.median(res['one stream']):.2f}x; "
          "greedy tokens and last logits bit-identical: True")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
