"""Does quantizing the MoE router change which experts are chosen?

Measures routing agreement: the fraction of tokens whose top-k expert *set* is the same
with the router weight ``moe.gate`` kept in float (the checkpoint's bf16, run in float32)
and with it quantized (MLX affine, group 64, 8 / 6 / 4 bits). Two settings:

1. the real router shape (4096 -> 288 experts, top-8, sigmoid + selection bias) with
   random bf16 weights (Gaussian, and heavy-tailed) and random inputs;
2. a model: every MoE layer of a checkpoint folder (``--model DIR``, e.g. the demo
   model) or of a tiny synthetic Step 3.5 model, on the hidden states that actually
   reach each router when running a token sequence through the float model.

The result decides the converter's policy (``step35_mlx/quant/recipes.py``).

    python benchmarks/router_precision.py [--model DIR] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402


def topk_sets(x: mx.array, w: mx.array, bias: mx.array, k: int) -> np.ndarray:
    s = mx.sigmoid(x.astype(mx.float32) @ w.astype(mx.float32).T) + bias.astype(mx.float32)
    idx = mx.argpartition(-s, kth=k - 1, axis=-1)[..., :k]
    return np.sort(np.array(idx).reshape(-1, k), axis=-1)


def requant(w: mx.array, bits: int, group: int = 64) -> mx.array:
    return mx.dequantize(*mx.quantize(w, group, bits), group_size=group, bits=bits)


def real_shape(tokens: int) -> None:
    H, E, K = 4096, 288, 8
    mx.random.seed(0)
    x = mx.random.normal((tokens, H))
    bias = mx.random.normal((E,)) * 0.05
    for label, w in (
        ("gaussian", mx.random.normal((E, H)) / np.sqrt(H)),
        ("heavy-tailed", mx.random.normal((E, H)) * mx.exp(0.5 * mx.random.normal((E, H))) / np.sqrt(H)),
    ):
        w = w.astype(mx.bfloat16)
        ref = topk_sets(x, w, bias, K)
        row = [f"{label:13s}"]
        for bits in (8, 6, 4):
            same = float((topk_sets(x, requant(w, bits), bias, K) == ref).all(-1).mean())
            row.append(f"{bits}-bit {100 * same:5.1f}% (42 layers all same ~{100 * same ** 42:5.1f}%)")
        print("  ".join(row))


def model_agreement(model_dir: Path | None, tokens: int) -> None:
    from step35_mlx import load_model

    if model_dir is None:
        import tempfile

        from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

        tmp = Path(tempfile.mkdtemp())
        cfg = tiny_config(hidden_size=256, num_layers=6, vocab_size=512, num_experts=64, top_k=8,
                          moe_intermediate_size=64, share_expert_dim=64)
        write_hf_checkpoint(tmp, cfg, num_shards=1)
        model_dir = tmp
        print(f"tiny synthetic model (hidden 256, 64 experts, top-8, {len(cfg['moe_layers_enum'].split(','))} MoE layers)")
    model = load_model(model_dir, dtype=mx.float32)
    V = model.config.vocab_size
    seq = mx.array(np.random.default_rng(0).integers(0, V, size=(1, tokens)))
    captured = {}
    for i, layer in enumerate(model.layers):
        if not layer.is_moe:
            continue
        orig = layer.moe.route

        def hook(x, i=i, orig=orig):
            captured[i] = x
            return orig(x)

        layer.moe.route = hook
    mx.eval(model(seq))
    for bits in (8, 6, 4):
        agree = []
        for i, x in sorted(captured.items()):
            moe = model.layers[i].moe
            w = moe.gate.weight.astype(mx.bfloat16)  # the release stores the router in bf16
            ref = topk_sets(x, w, moe.router_bias, moe.top_k)
            got = topk_sets(x, requant(w, bits), moe.router_bias, moe.top_k)
            agree.append(float((ref == got).all(-1).mean()))
        print(f"  {bits}-bit router: per-layer agreement {', '.join(f'{100 * a:.1f}%' for a in agree)}"
              f" (mean {100 * np.mean(agree):.1f}%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: tiny synthetic model)")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    print("real router shape (4096 -> 288, top-8), random bf16 weights, float32 compute:")
    real_shape(args.tokens)
    print("model routers on their real inputs:")
    model_agreement(args.model, min(args.tokens, 2048))


if __name__ == "__main__":
    main()
