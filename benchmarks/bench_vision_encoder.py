"""Time the Step 3.7 vision tower (encoder + projector) on one 728x728 view: ours (MLX) vs transformers (torch).

Released geometry (width 1536, 47 layers, 16 heads, MLP 8960). To fit a shared 24 GB box the 47
blocks share one block's weights (the compute is that of 47 distinct blocks; only memory differs);
the downsamplers and projector are full size. Prints seconds per view, achieved TFLOP/s and peak
memory for each, and the ratio. transformers/torch are optional (``--no-reference`` skips them).

    python benchmarks/bench_vision_encoder.py [--dtype float32|bfloat16] [--side 728] [--layers 47]
                                              [--no-reference | --reference-only]

``--layers N`` runs N of the 47 blocks (for slow backends) and prints the FLOPs of that run; the
per-view time is then the measured time scaled by the FLOP ratio, printed as an extrapolation.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step35_mlx.vision.config import VisionConfig  # noqa: E402
from step35_mlx.vision.costs import view_cost  # noqa: E402
from step35_mlx.vision.tower import VisionTower  # noqa: E402


def ours(cfg: VisionConfig, side: int, dtype: mx.Dtype) -> tuple[float, float]:
    tower = VisionTower(cfg)
    block = tower.encoder.layers[0]
    block.ls_1 = mx.full((cfg.hidden_size,), 0.1)
    block.ls_2 = mx.full((cfg.hidden_size,), 0.1)
    tower.encoder.layers = [block] * cfg.num_layers
    tower.set_dtype(dtype)
    mx.eval(tower.parameters())
    px = mx.array(np.random.default_rng(0).standard_normal((1, 3, side, side), dtype=np.float32)).astype(dtype)
    mx.eval(tower(px[:, :, :224, :224]))  # warm-up: kernels, allocator
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    mx.eval(tower(px))
    return time.perf_counter() - t0, mx.get_peak_memory() / 1e9


def reference(cfg: VisionConfig, side: int, dtype: str) -> tuple[float, float]:
    import torch
    from transformers.models.step3p7.configuration_step3p7 import Step3p7VisionConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7VisionModel

    tcfg = Step3p7VisionConfig(hidden_size=cfg.hidden_size, num_hidden_layers=1, num_attention_heads=cfg.num_heads,
                               mlp_ratio=cfg.intermediate_size / cfg.hidden_size, image_size=cfg.image_size,
                               patch_size=cfg.patch_size)
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = Step3p7VisionModel(tcfg).to(tdtype).eval()
    model.layers = torch.nn.ModuleList([model.layers[0]] * cfg.num_layers)
    proj = torch.nn.Linear(4 * cfg.hidden_size, cfg.text_hidden_size, bias=False).to(tdtype)
    px = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, side, side), dtype=np.float32)).to(tdtype)
    with torch.no_grad():
        proj(model(px[:, :, :224, :224]).last_hidden_state)
        t0 = time.perf_counter()
        proj(model(px).last_hidden_state)
        dt = time.perf_counter() - t0
    return dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--side", type=int, default=728)
    ap.add_argument("--layers", type=int, default=47, help="encoder blocks to run (47 = the whole view)")
    ap.add_argument("--no-reference", action="store_true", help="only ours")
    ap.add_argument("--reference-only", action="store_true", help="only transformers (e.g. in a second process)")
    args = ap.parse_args()
    full = view_cost(VisionConfig(), args.side).flops
    cfg = VisionConfig(num_layers=args.layers)
    flops = view_cost(cfg, args.side).flops
    print(f"device {mx.default_device()}, {args.dtype}, one {args.side}x{args.side} view: "
          f"{full / 1e12:.2f} TFLOP ({view_cost(cfg, args.side).tokens} image tokens); this run: "
          f"{args.layers} blocks, {flops / 1e12:.2f} TFLOP")

    def per_view(seconds: float) -> str:
        return "" if args.layers == 47 else f"   -> {seconds * full / flops:.0f} s per full view (extrapolated)"

    t = None
    if not args.reference_only:
        t, peak = ours(cfg, args.side, getattr(mx, args.dtype))
        print(f"  step35-mlx (MLX)     {t:8.1f} s   {flops / t / 1e12:6.3f} TFLOP/s   peak {peak:.2f} GB (MLX)"
              + per_view(t), flush=True)
    if not args.no_reference:
        tr, rss = reference(cfg, args.side, args.dtype)
        print(f"  transformers (torch) {tr:8.1f} s   {flops / tr / 1e12:6.3f} TFLOP/s   max RSS {rss:.2f} GB (process)"
              + per_view(tr))
        if t is not None:
            print(f"  ratio ours/transformers: {t / tr:.2f}x time")


if __name__ == "__main__":
    main()
