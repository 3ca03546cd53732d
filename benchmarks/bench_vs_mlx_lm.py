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

Before timing, both models must agree on logits: an uncached forward of a short
prompt (all positions), and (checked in the first repeat) the logits after the
cached prefill of the benchmark prompt and the first decode block; the greedy
tokens are compared too. Then, after a short warm-up, ``--repeats`` repeats of:

* prefill: time to the first token of each project's own generator with a
  2048-token prefill chunk (one chunk here). Ours: ``decode.ar_tokens``, run
  for real. mlx-lm: ``generate_step``'s prefill, mirrored (the prompt minus its
  last token through the cache with only the cache evaluated, then the last
  token). tok/s = prompt length / time to the first token. The models prefill
  one after the other; which goes first alternates between repeats.
* decode: ``--gen`` greedy steps in the same plain loop for both (argmax of the
  last logits fed back, step i+1 queued with ``mx.async_eval`` before waiting on
  step i, as both generators do), interleaved in blocks of ``--block`` tokens
  (ours 4, mlx-lm 4, ours 4, ...) so background load hits both alike.
* memory: ``mx.get_peak_memory()`` over each phase minus the active memory at
  its start (both models live in this process), plus the model's own weight
  bytes (and, for decode blocks, its KV cache at the block start): the peak
  the model would reach if loaded alone.

Both models are reloaded before every repeat after the first, in the order
that repeat runs them: on this CPU build the model loaded first ran its
memory-bound matvecs up to ~10% slower (which project it was did not matter),
so load order is alternated too. Besides wall-clock tok/s the table gives
tok/s per CPU-second of this process (``time.process_time``), which is far
less sensitive to other jobs on the machine.

Float32 activations on CPU (bf16 is 8-10x slower on MLX's CPU build; the Linux
``mlx[cpu]`` wheel links the reference BLAS, so absolute numbers are low).
Medians over repeats; ratios are ours / mlx-lm (>1 is better for tok/s, <1 is
better for memory).

    python benchmarks/bench_vs_mlx_lm.py            # ~5 min on 2 idle cores, ~7 with a training job beside it
    python benchmarks/bench_vs_mlx_lm.py --quick    # smoke run, ~1 min
    python benchmarks/bench_vs_mlx_lm.py --workdir /tmp/s35bench --json out.json   # keep the checkpoint
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

from step35_mlx.bench_checkpoint import FULL, bench_config, write_checkpoint  # noqa: E402
from step35_mlx.streams import use_two_streams  # noqa: E402

MIB = 1024 * 1024


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
    """Every array a cache list holds (K/V may be tuples when quantized)."""
    out = []
    for c in cache:
        for a in (c.keys, c.values):
            if a is not None:
                out.extend(a if isinstance(a, (tuple, list)) else [a])
    return out


def prefill_ours(model, prompt: mx.array, step: int):
    """Our generator's own prefill: the first token out of ``decode.ar_tokens`` (greedy).

    ``ar_tokens`` queues the next step before it yields, so that step (decode work) is
    waited for untimed and rolled back with ``trim(1)`` (exact in our caches); the plain
    decode loop then continues from the first token. Returns (cache, first token, wall s, CPU s).
    """
    from step35_mlx.decode import ar_tokens
    from step35_mlx.sampling import SamplingParams

    cache = model.make_cache()
    t0, c0 = time.perf_counter(), time.process_time()
    gen = ar_tokens(model, cache, prompt.reshape(-1), SamplingParams(temperature=0.0), prefill_step=step)
    y = next(gen)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gen.close()
    mx.synchronize()
    for c in cache:
        c.trim(1)
    return cache, mx.array([y]), wall, cpu


def prefill_theirs(model, prompt: mx.array, step: int):
    """mlx-lm's ``generate_step`` prefill, mirrored: all but the last token in chunks of ``step``
    (``mx.eval`` of the cache; logits never computed), then the last token -> logits -> argmax.
    (Its generator cannot hand the cache back one token early: a wrapped ``RotatingKVCache``
    does not trim.) Returns (cache, first token, wall s, CPU s)."""
    cache = model.make_cache()
    t0, c0 = time.perf_counter(), time.process_time()
    rest = prompt
    while rest.shape[1] > 1:
        n = min(step, rest.shape[1] - 1)
        model(rest[:, :n], cache=cache)
        mx.eval(cache_arrays(cache))
        rest = rest[:, n:]
    y = mx.argmax(model(rest, cache=cache)[:, -1, :], axis=-1)
    mx.eval(y)
    return cache, y, time.perf_counter() - t0, time.process_time() - c0


PREFILL = {"ours": prefill_ours, "mlx-lm": prefill_theirs}


def decode(model, cache, y: mx.array, n: int) -> tuple[list[int], mx.array, mx.array]:
    """``n`` greedy steps, pipelined like both generators (step i+1 queued before waiting on step i).

    Returns the tokens, the last one as an array (the next block's input) and the last logits.
    """

    def step(tok):
        logits = model(tok[:, None], cache=cache)[:, -1, :]
        return mx.argmax(logits, axis=-1), logits

    out = []
    nxt = step(y)
    mx.async_eval(nxt)
    for i in range(n):
        cur = nxt
        if i + 1 < n:
            nxt = step(cur[0])
            mx.async_eval(nxt)
        out.append(cur[0].item())
    return out, cur[0], cur[1]


def measured_repeat(models: dict, weights: dict, order: list[str], prompt: mx.array, gen: int,
                    step: int, block: int) -> dict[str, dict]:
    """One repeat: each model's prefill (in ``order``), then their decodes interleaved in blocks of ``block`` tokens.

    Block interleaving spreads background load over both models at a fine grain; each block
    ends with its last token on the host, which costs both models the same one-step bubble.
    Memory: process peak minus active memory at the start of the phase, plus the model's own
    weights (and, for decode blocks, its own KV cache at the start of the block).
    """
    res: dict[str, dict] = {}
    state = {}
    for name in order:
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        cache, y, dt, dc = PREFILL[name](models[name], prompt, step)
        peak = weights[name] + mx.get_peak_memory() - base
        res[name] = {"prefill_tps": prompt.shape[1] / dt, "prefill_tps_cpu": prompt.shape[1] / dc,
                     "peak_prefill": peak, "peak_decode": peak, "decode_s": 0.0, "decode_cpu_s": 0.0,
                     "tokens": [int(y.item())]}
        state[name] = (cache, y)
    gc.collect()
    for start in range(0, gen, block):
        n = min(block, gen - start)
        for name in order:
            cache, y = state[name]
            kv = sum(a.nbytes for a in cache_arrays(cache))
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            t0, c0 = time.perf_counter(), time.process_time()
            toks, y, logits = decode(models[name], cache, y, n)
            if start == 0:
                res[name]["logits"] = logits
            res[name]["decode_s"] += time.perf_counter() - t0
            res[name]["decode_cpu_s"] += time.process_time() - c0
            peak = weights[name] + kv + mx.get_peak_memory() - base
            res[name]["peak_decode"] = max(res[name]["peak_decode"], peak)
            res[name]["tokens"] += toks
            state[name] = (cache, y)
    for name in order:
        r = res[name]
        r["decode_tps"] = gen / r.pop("decode_s")
        r["decode_tps_cpu"] = gen / r.pop("decode_cpu_s")
        r["kv_bytes"] = sum(a.nbytes for a in cache_arrays(state[name][0]))
    return res


# ----------------------------------------------------------------------------- main


def rel_diff(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 96-token prompt, 16 decode tokens, window 64")
    ap.add_argument("--repeats", type=int, default=None, help="measured repeats per model (default 2; quick 1)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; quick 96)")
    ap.add_argument("--gen", type=int, default=None, help="decoded tokens (default 128; quick 16)")
    ap.add_argument("--window", type=int, default=None,
                    help="sliding window (default 256; quick 64): below the prompt length, so windowed masks "
                         "and the ring wrap are exercised")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prefill-step", type=int, default=2048, help="prefill chunk (mlx-lm's default 2048)")
    ap.add_argument("--block", type=int, default=4, help="decode tokens per interleaved block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--streams", type=int, choices=[1, 2], default=1,
                    help="CPU streams for our decode (2: streams.use_two_streams); mlx-lm always runs on one")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--tol", type=float, default=1e-4, help="max|diff|/max|logit| allowed before timing")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    T = args.prompt or (96 if args.quick else 512)
    gen = args.gen or (16 if args.quick else 128)
    if args.window is None:
        args.window = 64 if args.quick else 256

    mx.set_default_device(mx.cpu)
    import mlx_lm

    cfg = bench_config(args)
    print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, device {mx.default_device()}, float32 activations, "
          f"ours on {args.streams} CPU stream(s)")
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
    n_params, reused = write_checkpoint(ckpt, cfg, args.seed)
    print(f"checkpoint: {n_params / 1e6:.1f} M params, {(ckpt / 'model.safetensors').stat().st_size / MIB:.0f} MiB "
          f"on disk, {'reused' if reused else 'written'} in {time.perf_counter() - t:.1f} s ({ckpt})")

    loaders = {"ours": load_ours, "mlx-lm": load_theirs}
    models: dict = {}
    weights: dict = {}

    def load_all(order: list[str], verbose: bool = False) -> None:
        """(Re)load both models in ``order``. Where a model's weight buffers land depends on load order
        (on this CPU build the model loaded first ran its memory-bound matvecs up to ~10% slower, e.g.
        the lm_head, whichever project it was), so repeats alternate the order."""
        models.clear()
        gc.collect()
        mx.clear_cache()
        for name in order:
            before = mx.get_active_memory()
            models[name] = loaders[name](ckpt)
            if name == "ours":
                use_two_streams(models[name], args.streams == 2)
            mx.eval(models[name].parameters())
            weights[name] = param_bytes(models[name])
            if verbose:
                print(f"loaded {name}: parameters {weights[name] / MIB:.1f} MiB "
                      f"(active memory +{(mx.get_active_memory() - before) / MIB:.1f} MiB)")

    names = list(loaders)
    load_all(names, verbose=True)

    # ---- consistency 1: uncached forward of a short prompt, all positions; then a short cached warm-up
    key = mx.random.key(args.seed + 1)
    prompt = mx.random.randint(3, args.vocab, (1, T), key=key)
    short = prompt[:, :32]
    r_short = rel_diff(models["ours"](short), models["mlx-lm"](short))
    print(f"consistency: uncached 32-token forward, all positions: max|diff|/max|logit| = {r_short:.2e} "
          f"(tolerance {args.tol:g})", flush=True)
    if r_short > args.tol:
        print("the two models disagree; the timing comparison would be meaningless", file=sys.stderr)
        return 1
    for name, model in models.items():
        cache, y, _, _ = PREFILL[name](model, prompt[:, :16], args.prefill_step)
        decode(model, cache, y, 4)
        del cache

    # ---- measured: prefills one after the other (order alternating per repeat), decodes interleaved
    # in blocks; consistency 2 (cached prefill of the bench prompt) after the first repeat
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t = time.perf_counter()
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        if r > 0:
            load_all(order)
        res = measured_repeat(models, weights, order, prompt, gen, args.prefill_step, args.block)
        for name in names:
            runs[name].append(res[name])
        print(f"  repeat {r + 1}/{repeats} ({order[0]} loaded and run first): " + ", ".join(
            f"{n} prefill {res[n]['prefill_tps']:.2f} tok/s decode {res[n]['decode_tps']:.2f} tok/s"
            for n in names), flush=True)
        if r == 0:
            r_prefill = rel_diff(res["ours"]["logits"], res["mlx-lm"]["logits"])
            print(f"consistency: logits after the cached {T}-token prefill and {min(args.block, gen)} decode steps: "
                  f"max|diff|/max|logit| = {r_prefill:.2e}", flush=True)
            if r_prefill > args.tol:
                print("the two models disagree; the timing comparison would be meaningless", file=sys.stderr)
                return 1
        for name in names:
            res[name].pop("logits")
    elapsed = time.perf_counter() - t
    if tmp is not None:
        tmp.cleanup()

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
        ("prefill tok/s per CPU-second", "prefill_tps_cpu", 1, "{:.1f}"),
        ("decode tok/s per CPU-second", "decode_tps_cpu", 1, "{:.1f}"),
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
        cell_a = fmt.format(a) + (f" [{fmt.format(lo_a)}-{fmt.format(hi_a)}]" if "tps" in k else "")
        cell_b = fmt.format(b) + (f" [{fmt.format(lo_b)}-{fmt.format(hi_b)}]" if "tps" in k else "")
        print(f"{label:<36} {cell_a:>18} {cell_b:>18} {a / b:>11.3f}x")
        result[k] = {"ours": a, "mlx-lm": b, "ratio": a / b}
    wa, wb = weights["ours"] / MIB, weights["mlx-lm"] / MIB
    print(f"{'weights (MiB)':<36} {wa:>18.1f} {wb:>18.1f} {wa / wb:>11.3f}x")
    print("-" * 87)
    print(f"medians of {repeats} repeats [min-max]. Per repeat both models are (re)loaded and prefill in the "
          f"same order, alternating between repeats; decodes alternate every {args.block} tokens. Per-CPU-second "
          f"rates use this process's CPU time (robust to other jobs on the machine). Peak memory = own weights "
          f"+ (process peak - active memory at the start of each phase). Measured phase: {elapsed:.0f} s.")
    print("ours / mlx-lm: " + ", ".join([
        f"prefill {result['prefill_tps']['ratio']:.2f}x (CPU time {result['prefill_tps_cpu']['ratio']:.2f}x)",
        f"decode {result['decode_tps']['ratio']:.2f}x (CPU time {result['decode_tps_cpu']['ratio']:.2f}x)",
        f"peak memory {result['peak_decode']['ratio']:.3f}x",
    ]) + "   [issue 2 targets: prefill >= 1.0x, decode >= 1.0x, peak memory <= 1.05x]")

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
