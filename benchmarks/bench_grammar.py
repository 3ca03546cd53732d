#!/usr/bin/env python3
"""Constrained decoding overhead: grammar engines side by side, and ms/token with and without a schema.

1. Engines (llguidance, what ``step35_mlx.grammar`` uses, vs xgrammar when installed) on the
   demo model's tokenizer: a valid instance of a JSON schema (nested object, enum, array) is
   tokenized and walked token by token; each step times "compute the next-token mask" (fill a
   bitmask), then consumes the token. Median and max over the walk, repeated ``--repeats`` times.
2. Mask application at the release's vocabulary (128,896): unpacking the bitmask (NumPy) and
   ``where(allowed, logits, -inf)``, the per-row work our processor adds after the engine.
3. Generation with the demo model (or ``--model``), greedy, plain and MTP: ms/token of
   ``stream_generate`` unconstrained vs with the schema (``response_format``), same prompt,
   median over ``--repeats`` alternating runs; constrained runs end at eos, unconstrained ones
   run the same number of tokens.
4. ``tool_choice`` auto on free text: the same answer (reasoning closed in the prompt, no call
   opened) with tools under auto (the grammar waits for ``<tool_call>``; only the spelled-opener
   guard runs) vs ``tool_choice="none"``, ms/token, and whether the tokens are identical; plus the
   guard's one-time mask build for a state at the release's vocabulary size (synthetic texts).

    python benchmarks/bench_grammar.py                  # ~2-3 min on 2 CPU cores
    python benchmarks/bench_grammar.py --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step35_mlx import load  # noqa: E402
from step35_mlx.generate import stream_generate  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"age": {"type": "integer"}, "city": {"type": "string"}},
                  "required": ["age", "city"], "additionalProperties": False},
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Rex", "kind": "dog", "tags": ["good", "small", "brown"], "owner": {"age": 42, "city": "Paris"}}
RELEASE_VOCAB = 128_896


def walk_llguidance(hf, vocab: int, eos: list[int], ids: list[int]) -> list[float]:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp

    tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=eos)
    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    bitmask = lnp.allocate_token_bitmask(1, vocab)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        lnp.fill_next_token_bitmask(matcher, bitmask, 0)
        times.append(time.perf_counter() - t0)
        assert (int(bitmask[0, t >> 5]) >> (t & 31)) & 1 and matcher.consume_token(t), "instance rejected"
    return times


def walk_xgrammar(hf, vocab: int, eos: list[int], ids: list[int]) -> list[float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA)))
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - t0)
        assert (int(bitmask[0, t >> 5]) >> (t & 31)) & 1 and matcher.accept_token(t), "instance rejected"
    return times


def engines(tokenizer, vocab: int, eos: list[int], repeats: int) -> dict:
    hf = tokenizer._tokenizer
    ids = tokenizer.encode(json.dumps(INSTANCE), add_special_tokens=False) + [eos[0]]
    out = {}
    for name, walk in (("llguidance", walk_llguidance), ("xgrammar", walk_xgrammar)):
        try:
            runs = [walk(hf, vocab, eos, ids) for _ in range(repeats)]
        except ImportError:
            out[name] = None
            continue
        flat = [t for r in runs for t in r]
        out[name] = {"median_ms": 1e3 * statistics.median(flat), "mean_ms": 1e3 * statistics.fmean(flat),
                     "max_ms": 1e3 * max(flat), "tokens": len(ids)}
    return out


def mask_apply(repeats: int) -> float:
    """ms to unpack a bitmask and mask one row of logits at the release's vocabulary."""
    V = RELEASE_VOCAB
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats * 20):
        bits = rng.integers(0, 2**32, size=(V + 31) // 32, dtype=np.uint32)
        logits = mx.random.normal((1, V))
        mx.eval(logits)
        t0 = time.perf_counter()
        allowed = mx.array(np.unpackbits(bits.view(np.uint8), bitorder="little")[:V].astype(np.bool_))
        mx.eval(mx.where(allowed, logits, -float("inf")))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ms_per_token(model, tok, prompt: str, **kw) -> tuple[float, int]:
    """ms per decode step after the first token (prefill excluded) of one greedy run, and its token count."""
    chunks = list(stream_generate(model, tok, prompt, temperature=0, **kw))
    return 1e3 / max(chunks[-1].stats.generation_tps, 1e-9), len(chunks)


def generation(model, tok, prompt: str, repeats: int, fmt: dict, mtp: bool) -> dict:
    """Constrained and unconstrained runs alternate (after one warm-up each) so background load hits both."""
    _, n = ms_per_token(model, tok, prompt, response_format=fmt, max_tokens=200, mtp=mtp)
    ms_per_token(model, tok, prompt, max_tokens=n, mtp=mtp)
    con, free = [], []
    for _ in range(repeats):
        con.append(ms_per_token(model, tok, prompt, response_format=fmt, max_tokens=200, mtp=mtp)[0])
        free.append(ms_per_token(model, tok, prompt, max_tokens=n, mtp=mtp)[0])
    c, f = statistics.median(con), statistics.median(free)
    return {"mtp": mtp, "tokens": n, "plain_ms": f, "schema_ms": c, "ratio": c / f}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[A-Z][a-z]+$"}, "days": {"type": "integer"}}, "required": ["city"]}}}]


def auto_tools(model, tok, repeats: int, mtp: bool, n: int = 200) -> dict:
    """ms/token of free text under tool_choice auto vs none (alternating runs and order, after a warm-up of each).

    Sampled (temperature 1, seed 2: the demo's greedy answers end after about 13 tokens; this one runs ~90).
    """
    ids = list(tok.apply_chat_template([{"role": "user", "content": "What does os.path.join do?"}],
                                       add_generation_prompt=True))
    ids += tok.encode("I will answer.\n</think>\n", add_special_tokens=False)

    def run(choice):
        chunks = list(stream_generate(model, tok, ids, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=2,
                                      max_tokens=n, mtp=mtp))
        return 1e3 / max(chunks[-1].stats.generation_tps, 1e-9), [c.token_ids[0] for c in chunks]

    _, auto_ids = run("auto")
    _, free_ids = run("none")
    auto, free = [], []
    for i in range(repeats):  # which one goes first alternates: the second run of a pair tends to be faster here
        if i % 2:
            free.append(run("none")[0])
        auto.append(run("auto")[0])
        if not i % 2:
            free.append(run("none")[0])
    a, f = statistics.median(auto), statistics.median(free)
    return {"mtp": mtp, "tokens": len(free_ids), "none_ms": f, "auto_ms": a, "ratio": a / f,
            "identical": auto_ids == free_ids}


def free_text_row(model, tok, repeats: int) -> dict:
    """ms per free-text row of the auto processor alone (context read, opener scan, guard) by context length."""
    from step35_mlx.grammar import constraint_for, grammar_processor

    V = model.config.vocab_size
    proc = grammar_processor(constraint_for(None, TOOLS), tok, vocab_size=V,
                             eos_ids=frozenset(model.config.eos_token_id), start=0, reasoning=False)
    words = tok.encode("the value of a list is returned as a string ", add_special_tokens=False)
    logits = mx.zeros((1, V))
    mx.eval(logits)
    out = {}
    for n in (128, 1024, 4096):
        ctx = mx.array((words * (n // len(words) + 1))[:n])
        mx.eval(ctx)
        times = []
        for _ in range(repeats * 20):
            t0 = time.perf_counter()
            mx.eval(proc(ctx, logits))
            times.append(time.perf_counter() - t0)
        out[n] = 1e3 * statistics.median(times)
    return out


def guard_build(repeats: int) -> float:
    """ms to build the spelled-opener guard's mask for one state over RELEASE_VOCAB token texts."""
    from step35_mlx.grammar.auto import OpenerGuard

    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghij klmnopqrstuvwxyz<>_/\n"))
    texts = ["".join(rng.choice(alphabet, size=int(k))) for k in rng.integers(1, 8, size=RELEASE_VOCAB)]
    times = []
    for _ in range(repeats):
        guard = OpenerGuard(texts, opener=-1)
        t0 = time.perf_counter()
        guard.forbidden(1)  # text ends in "<": tokens starting "tool_call>" / holding "<tool_call>"
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompt", default="The weather today")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model, tok = load(a.model)
    vocab = model.config.vocab_size
    eos = sorted(model.config.eos_token_id)
    result = {"vocab": vocab, "engines": engines(tok, vocab, eos, a.repeats), "mask_apply_ms_at_128896": mask_apply(a.repeats)}
    print(f"grammar engines on {a.model}'s tokenizer (vocab {vocab}), mask per token:")
    for name, r in result["engines"].items():
        print(f"  {name:<11} " + ("not installed" if r is None else
              f"median {r['median_ms']:.4f} ms  mean {r['mean_ms']:.4f} ms  max {r['max_ms']:.3f} ms  ({r['tokens']} tokens)"))
    print(f"mask application at vocab {RELEASE_VOCAB}: {result['mask_apply_ms_at_128896']:.3f} ms/row")
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    rows = [generation(model, tok, a.prompt, a.repeats, fmt, mtp) for mtp in (False, True)]
    result["generation"] = rows
    print(f"generation, greedy, {a.model}: ms/token (median of {a.repeats})")
    print(f"  {'decoding':<10}{'tokens':>8}{'no schema':>12}{'schema':>10}{'ratio':>8}")
    for r in rows:
        print(f"  {'MTP' if r['mtp'] else 'plain':<10}{r['tokens']:>8}{r['plain_ms']:>12.2f}{r['schema_ms']:>10.2f}"
              f"{r['ratio']:>8.2f}")
    auto = [auto_tools(model, tok, a.repeats, mtp) for mtp in (False, True)]
    result["auto_tools"] = auto
    result["guard_build_ms_at_128896"] = guard_build(a.repeats)
    result["free_text_row_ms"] = free_text_row(model, tok, a.repeats)
    print(f"free text under tool_choice auto, sampled (seed 2), {a.model}: ms/token (median of {a.repeats})")
    print(f"  {'decoding':<10}{'tokens':>8}{'none':>10}{'auto':>10}{'ratio':>8}  identical tokens")
    for r in auto:
        print(f"  {'MTP' if r['mtp'] else 'plain':<10}{r['tokens']:>8}{r['none_ms']:>10.2f}{r['auto_ms']:>10.2f}"
              f"{r['ratio']:>8.2f}  {'yes' if r['identical'] else 'NO'}")
    print("auto processor alone on a free-text row, by context length: " + ", ".join(
        f"{n} tokens {ms:.3f} ms" for n, ms in result["free_text_row_ms"].items()))
    print(f"spelled-opener guard, one state's mask over {RELEASE_VOCAB} texts (once per tokenizer): "
          f"{result['guard_build_ms_at_128896']:.1f} ms")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
