"""Which trunk hidden should feed MTP module 0: pre- or post-final-norm? Measured, not assumed.

Runtimes disagree (vLLM / MTPLX: pre-norm; oMLX: post-norm). This prints, for each
variant, teacher-forced agreement of every MTP module with the trunk's greedy choice
(the acceptance greedy speculative decoding sees) and with the text, on held-out text.

    python benchmarks/mtp_hidden_variant.py                # bundled demo model
    python benchmarks/mtp_hidden_variant.py --model DIR --text FILE
"""

from __future__ import annotations

import argparse
from pathlib import Path

from step35_mlx import load
from step35_mlx.tune import teacher_forced_agreement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--text", type=Path, default=None, help="text file (default: the demo corpus' held-out split)")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    model, tok = load(args.model)
    if args.text:
        docs = [args.text.read_text()]
    else:
        from step35_mlx.demo.corpus import build_corpus

        docs = build_corpus(seed=0)[1]
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d, add_special_tokens=False)
        if len(ids) >= args.tokens:
            break
    ids = ids[: args.tokens]
    print(f"model {args.model}, {len(ids)} held-out tokens (chunks of 1024)")
    for variant in ("pre_norm", "post_norm"):
        model.mtp_hidden = variant
        sums = None
        chunks = 0
        for s in range(0, len(ids) - 8, 1024):
            r = teacher_forced_agreement(model, ids[s : s + 1024])
            sums = r if sums is None else {k: [a + b for a, b in zip(sums[k], r[k])] for k in r}
            chunks += 1
        trunk = " ".join(f"{v / chunks:.3f}" for v in sums["vs_trunk"])
        text = " ".join(f"{v / chunks:.3f}" for v in sums["vs_text"])
        print(f"{variant:<10} agreement with trunk per module: {trunk}   with text: {text}")


if __name__ == "__main__":
    main()
