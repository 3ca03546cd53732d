"""1 vs 2 local ranks (ring backend on loopback) for each parallel mode: speed, memory and bytes per token.

    python benchmarks/bench_distributed.py [--layers 8] [--experts 32]

Each mode runs in fresh processes, so a rank's peak resident memory (``ru_maxrss``) is that
mode's alone; "peak - base" subtracts what Python and MLX hold before loading. Bytes per token
are measured on the ranks' TCP sockets (Linux ``TCP_INFO``) as the difference between a 12- and a
4-token greedy run, and are also computed from the collectives each mode issues, for this model
(float32 activations) and for the release (bf16). On one CPU box the speed says nothing about
Macs over Thunderbolt; the memory and the bytes do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step35_mlx.config import ModelConfig  # noqa: E402
from step35_mlx.convert.dryrun import step3p5_flash_config  # noqa: E402
from step35_mlx.distributed.launch import spawn_local  # noqa: E402
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint  # noqa: E402

PROMPT = list(range(5, 37))
MODES = ("tensor", "expert", "pipeline")


def bytes_per_token(cfg: ModelConfig, mode: str, ranks: int, act_bytes: int) -> int:
    """Bytes each rank sends per decoded token by the collectives it issues (ring all-reduce: 2 (N-1)/N of the vector)."""
    h = cfg.hidden_size * act_bytes
    ring = 2 * (ranks - 1) * h // ranks
    token = 4 * ranks  # rank 0's token: an int32 all-reduce padded to one element per rank
    if mode == "tensor":
        return 2 * cfg.num_hidden_layers * ring + token
    if mode == "expert":
        return len(cfg.moe_layers) * ring + token
    return h + ring + token  # stage 0 sends to stage 1; then the last hidden state is shared


def _mb(x) -> str:
    return f"{int(x) / 1e6:8.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    args = ap.parse_args()
    cfg_dict = tiny_config(hidden_size=512, num_layers=args.layers, head_dim=64, intermediate_size=1024,
                           moe_intermediate_size=256, share_expert_dim=256, num_experts=args.experts,
                           vocab_size=1024, full_heads=8, sliding_heads=8, kv_heads=4)
    env = {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_hf_checkpoint(tmp / "ck", cfg_dict, seed=0)
        runs = {}
        spec = tmp / "single.json"
        spec.write_text(json.dumps({"out": str(tmp), "prompt": PROMPT, "single": True,
                                    "cases": [{"path": str(tmp / "ck")}]}))
        subprocess.run([sys.executable, "-m", "step35_mlx.distributed.probe", str(spec)], env=env, check=True, cwd=tmp)
        runs["1 rank"] = [dict(np.load(tmp / "single.npz"))]
        for m in MODES:
            spec = tmp / f"{m}.json"
            spec.write_text(json.dumps({"out": str(tmp), "prompt": PROMPT, "measure_bytes": True,
                                        "cases": [{"name": m, "path": str(tmp / "ck"), "mode": m}]}))
            results = spawn_local(2, ["-m", "step35_mlx.distributed.probe", str(spec)], tmp, env=env, timeout=900)
            bad = [r for r in results if r.returncode]
            if bad:
                raise SystemExit(f"{m}: rank {bad[0].rank} failed:\n{bad[0].stderr[-2000:]}")
            runs[m] = [dict(np.load(tmp / f"{m}.r{r}.npz")) for r in range(2)]
    cfg = ModelConfig.from_dict(cfg_dict)
    rel = ModelConfig.from_dict(step3p5_flash_config())
    ref = runs["1 rank"][0]
    n_tok = len(ref["greedy"])
    print(f"synthetic model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {args.experts} experts, "
          f"float32; {n_tok} greedy tokens; MB = 10^6 bytes")
    print(f"{'mode':9s} {'tok/s':>6s} {'weights r0':>10s} {'weights r1':>10s} {'peak-base r0':>12s} {'peak-base r1':>12s}"
          f" {'bytes/tok measured':>18s} {'counted':>8s} {'release KB/tok':>14s} {'same tokens':>11s}")
    for name, rs in runs.items():
        tps = n_tok / float(rs[0]["greedy_s"])
        w = [_mb(r["bytes"]) for r in rs] + [""] * (2 - len(rs))
        peak = [_mb(int(r["peak_rss"]) - int(r["base_rss"])) for r in rs] + [""] * (2 - len(rs))
        if name == "1 rank":
            sent, counted, release = "0", "0", "0"
        else:
            sent = f"{float(rs[0]['decode_bytes']):.0f}/{float(rs[1]['decode_bytes']):.0f}"
            counted = str(bytes_per_token(cfg, name, 2, 4))
            release = f"{bytes_per_token(rel, name, 2, 2) / 1e3:.1f}"
        same = all(r["greedy"].tolist() == ref["greedy"].tolist() for r in rs)
        print(f"{name:9s} {tps:6.1f} {w[0]:>10s} {w[1]:>10s} {peak[0]:>12s} {peak[1]:>12s} {sent:>18s} {counted:>8s}"
              f" {release:>14s} {str(same):>11s}")


if __name__ == "__main__":
    main()
