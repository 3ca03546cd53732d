#!/usr/bin/env python3
"""Reduced-vocabulary MTP drafts on the bundled demo: acceptance and bytes per token vs full-vocab drafts.

The ranking is counted from the demo's *training* documents (``demo.corpus.build_corpus``,
tokenized with the demo tokenizer; the special tokens first). For each draft vocabulary
size N and MTP depth d, ``--tokens`` greedy tokens are decoded after each of the chat
prompts below (plus plain decoding), checking every output equals plain decoding's.
Bytes per generated token come from ``costs.decode_cost`` (recorded routing, the drafting
calls with an N-row head). Then the release's bytes/token is projected from the same cost
model: its plain step, each MTP module with a 128,896-row or N-row head (scaled as N / V),
and the measured acceptance. ``--write N`` stores the ranking and N in the demo folder (update its manifest.json after).

    python benchmarks/bench_draft_vocab.py                 # ~3 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step35_mlx import load  # noqa: E402
from step35_mlx.draft_vocab import DraftVocab, rank_tokens, save_draft_vocab  # noqa: E402
from step35_mlx.tune import measure_one  # noqa: E402

QUESTIONS = ["Explain what the `with` statement does in Python, with an example.",
             "What is a generator?", "How do I open a file and read its lines?"]


BPW = 4.5 / 8  # q4: 4-bit weights + a bf16 scale and bias per 64 weights, bytes per weight


def release_bytes() -> dict:
    """Bytes one decode forward of the release reads at q4, from its bundled config.json.

    Attention (q/k/v/o/g of each layer's type), dense MLPs, shared experts, the bf16 router and
    the lm_head are read every forward (``fixed``); each routed expert is ``expert`` bytes per MoE
    layer; an MTP module is its decoder layer (sliding attention + dense MLP) and ``eh_proj``
    (``mtp_layer``) plus its 128,896-row head (``mtp_head_row`` bytes a row). Norms are ignored.
    """
    cfg = json.loads((Path(__file__).resolve().parents[1] / "step35_mlx" / "data" / "step3p5-flash-config.json").read_text())
    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    other = cfg["attention_other_setting"]
    moe = {int(i) for i in cfg["moe_layers_enum"].split(",")}

    def attn(kind: str) -> float:
        heads = other["num_attention_heads"] if kind == "sliding_attention" else cfg["num_attention_heads"]
        kv = other["num_attention_groups"] if kind == "sliding_attention" else cfg["num_attention_groups"]
        d = cfg["head_dim"]
        return (2 * heads * d * H + 2 * kv * d * H + heads * H) * BPW

    dense = 3 * cfg["intermediate_size"] * H * BPW
    expert = 3 * cfg["moe_intermediate_size"] * H * BPW
    fixed = V * H * BPW  # lm_head
    for i in range(L):
        fixed += attn(cfg["layer_types"][i])
        fixed += (3 * cfg["share_expert_dim"] * H * BPW + cfg["moe_num_experts"] * H * 2) if i in moe else dense
    mtp_layer = attn(cfg["layer_types"][L]) + dense + 2 * H * H * BPW
    return {"fixed": fixed, "expert": expert, "moe_layers": len(moe), "experts": cfg["moe_num_experts"],
            "top_k": cfg["moe_top_k"], "mtp_layer": mtp_layer, "mtp_head_row": H * BPW, "vocab": V}


def project_release(acceptance: list[float], head_rows: int, rel: dict) -> float:
    """Release bytes per generated token / plain's, for MTP with this per-position acceptance.

    A verify of d + 1 rows reads the union of their experts, taken as independent routing:
    ``E (1 - (1 - k/E)^(d+1))`` experts per MoE layer; tokens per verify is
    ``1 + a1 + a1 a2 + ...`` from the measured acceptance.
    """
    d = len(acceptance)
    E, k = rel["experts"], rel["top_k"]
    union = E * (1 - (1 - k / E) ** (d + 1))
    tpv, run = 1.0, 1.0
    for a in acceptance:
        run *= a
        tpv += run
    step = rel["fixed"] + union * rel["expert"] * rel["moe_layers"] + d * (rel["mtp_layer"] + head_rows * rel["mtp_head_row"])
    plain = rel["fixed"] + k * rel["expert"] * rel["moe_layers"]
    return step / tpv / plain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,1024,512,256,128")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--write", type=int, default=0, help="store the ranking with this N as the default size")
    args = ap.parse_args()
    from step35_mlx.demo.corpus import SPECIAL_TOKENS, build_corpus

    model, tok = load("demo")
    V = model.config.vocab_size
    t0 = time.perf_counter()
    train, _ = build_corpus()
    ranked = rank_tokens((tok.encode(d, add_special_tokens=False) for d in train), V,
                         always=tok.convert_tokens_to_ids(SPECIAL_TOKENS))
    print(f"ranking from {len(train)} training documents in {time.perf_counter() - t0:.0f} s")
    vocab = DraftVocab(tuple(ranked), source="demo training corpus")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in QUESTIONS]
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    plain_bytes = []
    refs = []
    for p in prompts:
        out, res = measure_one(model, p, 0, args.tokens)
        refs.append(out)
        plain_bytes.append(res.bytes_per_token)
    for d in range(1, model.num_mtp + 1):
        for n in sizes:
            ids = None if n >= V else vocab.top(n)
            acc, bpt, tpv = [], [], []
            for p, ref in zip(prompts, refs):
                out, res = measure_one(model, p, d, args.tokens, draft_vocab=ids)
                if out != ref:
                    raise RuntimeError(f"d={d} N={n}: output differs from plain decoding")
                acc.append(res.acceptance)
                bpt.append(res.bytes_per_token)
                tpv.append(res.tokens_per_verify)
            a = [statistics.mean(x[i] for x in acc) for i in range(d)]
            rows.append({"depth": d, "N": n, "acceptance": a, "tokens_per_verify": statistics.mean(tpv),
                         "bytes_ratio": statistics.mean(b / pb for b, pb in zip(bpt, plain_bytes))})
            r = rows[-1]
            print(f"d={d} N={n:5d}: acceptance {' '.join(f'{x:.2f}' for x in a)}, tokens/verify "
                  f"{r['tokens_per_verify']:.2f}, bytes/token {r['bytes_ratio']:.3f}x plain", flush=True)
    print("greedy outputs identical to plain decoding for every (d, N): True")
    rel = release_bytes()
    plain = rel["fixed"] + rel["top_k"] * rel["expert"] * rel["moe_layers"]
    print(f"release q4 projection (plain {plain / 1e9:.2f} GB per token; the demo's acceptance at the same "
          f"N / V share, N scaled to the release's {rel['vocab']:,} rows):")
    for r in rows:
        n_rel = round(rel["vocab"] * min(r["N"], V) / V)
        r["release_bytes_ratio"] = project_release(r["acceptance"], n_rel, rel)
        print(f"  d={r['depth']} N={n_rel:6d}: {r['release_bytes_ratio']:.3f}x plain")
    if args.write:
        path = save_draft_vocab(Path(model.source_path), ranked, "demo training corpus", args.write)
        print(f"wrote {path}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
