"""1 vs 2 local ranks (ring backend on loopback) for each parallel mode: tokens/s, per-rank weights, bytes sent per token.

    python benchmarks/bench_distributed.py [--layers 6]

On one CPU box the speed says nothing about Macs over Thunderbolt; the memory and the bytes do.
Bytes per token are counted from the collectives each mode issues per decoded token
(float32 activations here; bf16 on a Mac halves them), and printed for the release too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step35_mlx import load_model  # noqa: E402
from step35_mlx.config import ModelConfig  # noqa: E402
from step35_mlx.convert.dryrun import step3p5_flash_config  # noqa: E402
from step35_mlx.distributed.launch import spawn_local  # noqa: E402
from step35_mlx.distributed.probe import probe  # noqa: E402
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint  # noqa: E402

PROMPT = list(range(5, 37))


def bytes_per_token(cfg: ModelConfig, mode: str, ranks: int, act_bytes: int) -> int:
    """Activation bytes each rank sends per decoded token (ring all-reduce: 2 (N-1)/N of the vector)."""
    h = cfg.hidden_size * act_bytes
    ring = 2 * (ranks - 1) * h // ranks
    moe = len(cfg.moe_layers)
    token = 2 * (ranks - 1) * 4 // ranks  # rank 0's token, an int32 all-reduce
    if mode == "tensor":
        return 2 * cfg.num_hidden_layers * ring + token
    if mode == "expert":
        return moe * ring + token
    return h + ring + token  # one hop to the next stage (at most), then the last hidden shared


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    cfg_dict = tiny_config(hidden_size=256, num_layers=args.layers, head_dim=32, intermediate_size=512,
                           moe_intermediate_size=128, share_expert_dim=128, num_experts=16, vocab_size=512)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_hf_checkpoint(tmp / "ck", cfg_dict, seed=0)
        single = probe(load_model(tmp / "ck"), PROMPT)
        cases = [{"name": m, "path": str(tmp / "ck"), "mode": m} for m in ("tensor", "expert", "pipeline")]
        (tmp / "spec.json").write_text(json.dumps({"out": str(tmp), "prompt": PROMPT, "cases": cases}))
        results = spawn_local(2, ["-m", "step35_mlx.distributed.probe", str(tmp / "spec.json")], tmp,
                              env={"PYTHONPATH": str(ROOT)}, timeout=600)
        bad = [r for r in results if r.returncode]
        if bad:
            raise SystemExit(f"rank {bad[0].rank} failed:\n{bad[0].stderr[-2000:]}")
        cfg = ModelConfig.from_dict(cfg_dict)
        rel = ModelConfig.from_dict(step3p5_flash_config())
        n_tok = len(single["greedy"])
        print(f"synthetic model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, float32, {n_tok} greedy tokens")
        print(f"{'mode':10s} {'tok/s':>8s} {'rank0 MB':>9s} {'rank1 MB':>9s} {'bytes/token':>12s} {'release bf16 KB/token':>22s}")
        print(f"{'1 rank':10s} {n_tok / float(single['greedy_s']):8.1f} {int(single['bytes']) / 1e6:9.2f} {'':>9s} {0:12d}")
        for m in ("tensor", "expert", "pipeline"):
            r0, r1 = (dict(np.load(tmp / f"{m}.r{r}.npz")) for r in range(2))
            print(f"{m:10s} {n_tok / float(r0['greedy_s']):8.1f} {int(r0['bytes']) / 1e6:9.2f} {int(r1['bytes']) / 1e6:9.2f} "
                  f"{bytes_per_token(cfg, m, 2, 4):12d} {bytes_per_token(rel, m, 2, 2) / 1e3:22.1f}")


if __name__ == "__main__":
    main()
