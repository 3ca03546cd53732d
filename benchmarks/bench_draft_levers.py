#!/usr/bin/env python3
"""Cheaper lossless MTP drafts on the bundled demo: lower-bit MTP modules, reduced draft heads,
confidence-gated draft length, and their combinations, each at draft depth 1..3.

For every configuration and depth, ``--tokens`` greedy tokens are decoded after each of the
three chat prompts of ``bench_draft_vocab.py`` and checked equal to plain decoding's. Printed:
acceptance per position, tokens per verify, how many drafts the verifies checked (gated runs),
bytes per generated token against plain decoding (``costs.decode_cost``: recorded routing, the
MTP modules as actually requantized and called), and the release's bytes/token projected at
q4 from its config: each verify's expert union for the rows it had (independent routing), the
MTP module calls made, their bytes at the configured bits (``(bits + 0.5) / 8`` bytes a weight:
a bf16 scale and bias per 64) and head rows scaled to the same N / V share.

Configurations (``--configs``, ``;``-separated): ``base`` (as stored, full head), or tokens
``hB`` (head at B bits), ``lB`` (decoder layer and eh_proj at B bits), ``nN`` (N-row draft head,
ranking from the demo's training documents), ``gC`` (gate at running confidence C).

``--speed "base@2;g0.05@3" --repeats 5`` then times those settings (configuration@depth) against
plain decoding, interleaved, on the first prompt (median tokens/s).

    python benchmarks/bench_draft_levers.py --tokens 128     # ~8 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_draft_vocab import QUESTIONS, release_bytes  # noqa: E402

from step35_mlx import load  # noqa: E402
from step35_mlx.draft_config import DraftConfig, save_draft_config  # noqa: E402
from step35_mlx.draft_quant import requantize_mtp  # noqa: E402
from step35_mlx.draft_vocab import DraftVocab, rank_tokens, save_draft_vocab  # noqa: E402
from step35_mlx.speculative import SpecStats  # noqa: E402
from step35_mlx.tune import measure_one  # noqa: E402

DEFAULT_CONFIGS = "base;h3;l3;h2;l2;n1024;l3n1024;l2n1024;h3l2n1024;g0.05;g0.1;l2g0.05;h3l3g0.05"
_TOKEN = re.compile(r"([hlng])([0-9.]+)")


@dataclass(frozen=True)
class Config:
    name: str
    head_bits: int | None = None
    layer_bits: int | None = None
    n: int | None = None
    gate: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Config":
        if text == "base":
            return cls(text)
        fields = {}
        pos = 0
        for m in _TOKEN.finditer(text):
            if m.start() != pos:
                break
            key = {"h": "head_bits", "l": "layer_bits", "n": "n", "g": "gate"}[m.group(1)]
            fields[key] = float(m.group(2)) if key == "gate" else int(m.group(2))
            pos = m.end()
        if pos != len(text) or not fields:
            raise SystemExit(f"error: cannot read configuration {text!r} (base, or tokens hB lB nN gC)")
        return cls(text, **fields)


def union_experts(rows: int, rel: dict) -> float:
    """Expected distinct experts per MoE layer over ``rows`` independently routed rows."""
    E, k = rel["experts"], rel["top_k"]
    return E * (1 - (1 - k / E) ** rows)


def project(lengths: list[int], emitted: int, cfg: Config, vocab: int, rel: dict) -> float:
    """Release bytes per generated token / plain's, for these verify lengths and module calls."""
    bpw = 4.5
    head_rows = rel["vocab"] * min(cfg.n or vocab, vocab) / vocab
    module = (rel["mtp_layer"] * ((cfg.layer_bits or 4) + 0.5) / bpw
              + head_rows * rel["mtp_head_row"] * ((cfg.head_bits or 4) + 0.5) / bpw)
    depth = len(lengths) - 1
    calls = sum(sum(lengths[k:]) for k in range(depth))  # module k runs when drafts 0..k-1 were kept
    verify = sum(n * (rel["fixed"] + union_experts(i + 1, rel) * rel["expert"] * rel["moe_layers"])
                 for i, n in enumerate(lengths))
    plain = rel["fixed"] + rel["top_k"] * rel["expert"] * rel["moe_layers"]
    return (verify + calls * module) / emitted / plain


def requantized(models: dict, cfg: Config):
    """The demo with ``cfg``'s MTP bits (loaded once per bits pair)."""
    key = (cfg.head_bits, cfg.layer_bits)
    if key not in models:
        models[key], _ = load("demo")
        requantize_mtp(models[key], cfg.head_bits, cfg.layer_bits)
    return models[key]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--depths", default="1,2,3")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    ap.add_argument("--speed", default="", help="configuration@depth settings to time against plain decoding")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", default="", help="store this configuration in the demo folder (draft.json, and "
                    "draft_vocab.json when it has nN; update the folder's manifest.json after)")
    args = ap.parse_args()
    configs = [Config.parse(c) for c in args.configs.split(";") if c]
    if args.write:
        configs.append(Config.parse(args.write))
    depths = [int(d) for d in args.depths.split(",")]

    model, tok = load("demo")
    V = model.config.vocab_size
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in QUESTIONS]
    refs, plain_bytes = [], []
    for p in prompts:
        out, res = measure_one(model, p, 0, args.tokens)
        refs.append(out)
        plain_bytes.append(res.bytes_per_token)
    vocab = None
    if any(c.n for c in configs) or "n" in args.speed:
        from step35_mlx.demo.corpus import SPECIAL_TOKENS, build_corpus

        train, _ = build_corpus()
        vocab = DraftVocab(tuple(rank_tokens((tok.encode(d, add_special_tokens=False) for d in train), V,
                                             always=tok.convert_tokens_to_ids(SPECIAL_TOKENS))))
    rel = release_bytes()
    models: dict[tuple, object] = {(None, None): model}
    rows = []
    if configs:
        print("| d | configuration | acceptance per position | tokens/verify | drafts checked (0..d) | "
              "bytes/token vs plain | release projection |")
        print("|---|---|---|---|---|---|---|")
    for cfg in configs:
        m = requantized(models, cfg)
        ids = vocab.top(cfg.n) if cfg.n and cfg.n < V else None
        for d in depths:
            acc, ratios, lengths, emitted = [], [], [0] * (d + 1), 0
            for p, ref, pb in zip(prompts, refs, plain_bytes):
                stats = SpecStats(d)
                out, res = measure_one(m, p, d, args.tokens, draft_vocab=ids, min_confidence=cfg.gate, stats=stats)
                if out != ref:
                    raise RuntimeError(f"{cfg.name} d={d}: output differs from plain decoding")
                acc.append(res.acceptance)
                ratios.append(res.bytes_per_token / pb)
                lengths = [a + b for a, b in zip(lengths, stats.lengths)]
                emitted += stats.emitted
            row = {"depth": d, "config": cfg.name,
                   "acceptance": [statistics.mean(a[i] for a in acc) for i in range(d)],
                   "tokens_per_verify": emitted / sum(lengths), "lengths": lengths,
                   "bytes_ratio": statistics.mean(ratios), "release_bytes_ratio": project(lengths, emitted, cfg, V, rel)}
            rows.append(row)
            print(f"| {d} | {cfg.name} | {' '.join(f'{x:.2f}' for x in row['acceptance'])} | "
                  f"{row['tokens_per_verify']:.2f} | {' '.join(map(str, lengths))} | {row['bytes_ratio']:.3f} | "
                  f"{row['release_bytes_ratio']:.3f} |", flush=True)
    if rows:
        print("greedy outputs identical to plain decoding for every configuration and depth: True")
        best = min(rows, key=lambda r: r["bytes_ratio"])
        print(f"best on the demo: {best['config']} d={best['depth']} at {best['bytes_ratio']:.3f}x plain; "
              f"best release projection: {min(r['release_bytes_ratio'] for r in rows):.3f}x")
    if args.speed:
        timed = [(Config.parse(c.split("@")[0]), int(c.split("@")[1])) for c in args.speed.split(";") if c]
        speeds: dict[str, list[float]] = {"plain": []}
        for _ in range(args.repeats):
            speeds["plain"].append(measure_one(model, prompts[0], 0, args.tokens)[1].tokens_per_s)
            for cfg, d in timed:
                m = requantized(models, cfg)
                ids = vocab.top(cfg.n) if cfg.n and cfg.n < V else None
                res = measure_one(m, prompts[0], d, args.tokens, draft_vocab=ids, min_confidence=cfg.gate)[1]
                speeds.setdefault(f"{cfg.name} d={d}", []).append(res.tokens_per_s)
        base = statistics.median(speeds["plain"])
        for name, v in speeds.items():
            print(f"{name:24s} {statistics.median(v):7.1f} tok/s  {statistics.median(v) / base:.2f}x plain  "
                  f"(runs {' '.join(f'{x:.0f}' for x in v)})")
    if args.json:
        print(json.dumps(rows))
    if args.write:
        cfg = configs[-1]
        folder = Path(model.source_path)
        print(f"wrote {save_draft_config(folder, DraftConfig(cfg.head_bits, cfg.layer_bits, cfg.gate))}")
        if cfg.n:
            print(f"wrote {save_draft_vocab(folder, list(vocab.ids), 'demo training corpus', cfg.n)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
