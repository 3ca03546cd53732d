"""Convert the trained demo checkpoint to 4-bit MLX and bundle it in the package.

    python scripts/train_demo.py --out /work/demo_hf        # ~25 min on 2 cores (PyTorch)
    python scripts/bundle_demo.py --source /work/demo_hf     # seconds

Writes ``step35_mlx/demo/model/`` with our own converter (recipe q4), a held-out token
sample, and ``manifest.json``: the sha256 of every bundled file plus the 4-bit model's
held-out perplexity and MTP teacher-forced agreement, which the tests re-measure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

BUNDLE = Path(__file__).resolve().parents[1] / "step35_mlx" / "demo" / "model"
HELDOUT_CHUNKS = 24  # x 256 tokens, enough for a perplexity stable to well under 1 %
CHECK_CHUNKS = 6  # the subset tests/test_demo.py re-measures (fast on a CPU)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def heldout_ppl(model, chunks: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for ch in chunks:
        logits = model(mx.array([ch]))[0, :-1].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll -= float(mx.take_along_axis(lp, mx.array(ch[1:])[:, None], axis=-1).sum().item())
        n += len(ch) - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="HF-layout demo checkpoint from train_demo.py")
    ap.add_argument("--recipe", default="q4")
    args = ap.parse_args()

    if BUNDLE.exists():
        shutil.rmtree(BUNDLE)
    subprocess.run([sys.executable, "-m", "step35_mlx", "convert", str(args.source), "--out", str(BUNDLE),
                    "--recipe", args.recipe], check=True)
    heldout = json.loads((args.source / "heldout_tokens.json").read_text())
    chunks = heldout["chunks"][:HELDOUT_CHUNKS]
    (BUNDLE / "heldout_tokens.json").write_text(json.dumps({"seq_len": heldout["seq_len"], "chunks": chunks}))

    from step35_mlx import load_model
    from step35_mlx.tune import teacher_forced_agreement

    model = load_model(BUNDLE)
    source = load_model(args.source, dtype=mx.float32)
    agreement = [teacher_forced_agreement(model, ch) for ch in chunks]
    mean = {k: [sum(a[k][j] for a in agreement) / len(agreement) for j in range(model.num_mtp)]
            for k in ("vs_trunk", "vs_text")}
    report = json.loads((args.source / "train_report.json").read_text())
    manifest = {
        "recipe": args.recipe,
        "files": {p.name: sha256(p) for p in sorted(BUNDLE.iterdir()) if p.name != "manifest.json"},
        "heldout_tokens": sum(len(c) - 1 for c in chunks),
        "heldout_ppl_quantized": heldout_ppl(model, chunks),
        "check_chunks": CHECK_CHUNKS,
        "check_ppl_quantized": heldout_ppl(model, chunks[:CHECK_CHUNKS]),
        "heldout_ppl_source_bf16": heldout_ppl(source, chunks),
        "mtp_agreement_vs_trunk": mean["vs_trunk"],
        "mtp_agreement_vs_text": mean["vs_text"],
        "train_report": report,
    }
    (BUNDLE / "manifest.json").write_text(json.dumps(manifest, indent=2))
    size = sum(p.stat().st_size for p in BUNDLE.iterdir())
    print(json.dumps({k: v for k, v in manifest.items() if k not in ("files", "train_report")}, indent=2))
    print(f"bundled {size / 1e6:.2f} MB in {BUNDLE}")


if __name__ == "__main__":
    main()
