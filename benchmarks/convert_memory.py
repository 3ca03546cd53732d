"""Peak memory of a streaming conversion: it must not grow with the model.

Writes a synthetic Step 3.5-layout checkpoint of >= 2 GB (float32, random data, one
shard per layer, written tensor by tensor so writing it needs little memory either),
converts it to q4 in a child process, and prints the child's peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``), the largest source tensor and their
ratio. Target: peak RSS < 1 GB, or < 3x the largest tensor if that is larger.

    python benchmarks/convert_memory.py [--size-gb 2.2] [--dir /tmp/step35-convert-bench] [--keep]
    python benchmarks/convert_memory.py --real-dims   # one MoE layer at the real shapes (3 GB expert tensors)

``--real-dims`` writes a bf16 checkpoint with the release's real dimensions (hidden 4096,
288 experts x 1280, vocab 128896) but only one dense and one MoE layer, as *sparse*
files (all-zero data, so it takes no disk and no time to write): it shows the peak RSS
when the largest tensor is the release's 3.0 GB fused expert tensor.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step35_mlx.safetensors_io import ShardWriter, encode_header  # noqa: E402
from step35_mlx.quant.recipes import expected_tensors  # noqa: E402
from step35_mlx.synthetic import tiny_config  # noqa: E402


def bench_config(num_layers: int) -> dict:
    return tiny_config(
        hidden_size=1024, num_layers=num_layers, num_mtp=1, vocab_size=32768, full_heads=8, sliding_heads=8,
        kv_heads=2, head_dim=128, intermediate_size=2048, num_experts=64, top_k=4,
        moe_intermediate_size=512, share_expert_dim=512, sliding_window=64,
    )


def real_dims_config() -> dict:
    from step35_mlx.convert.dryrun import step3p5_flash_config

    cfg = step3p5_flash_config()
    n = 2
    for k in ("rope_theta", "layer_types", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
        cfg[k] = cfg[k][:n]
    cfg.update(num_hidden_layers=n, num_nextn_predict_layers=0, moe_layers_enum="1")
    return cfg


def write_sparse_checkpoint(path: Path) -> tuple[int, int]:
    """Real-dimension bf16 checkpoint with zero (sparse) data: headers only on disk."""
    from step35_mlx.safetensors_io import nbytes

    cfg = real_dims_config()
    shapes = expected_tensors(cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    entries = [(k, "F32" if k.endswith("router_bias") else "BF16", tuple(s)) for k, s in shapes]
    header, _ = encode_header(entries, {"format": "pt"})
    total = sum(nbytes(d, s) for _, d, s in entries)
    with open(path / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + total)
    return total, max(nbytes(d, s) for _, d, s in entries)


def hf_key(name: str, n_trunk: int) -> str:
    if name.startswith("model.mtp."):
        _, _, j, rest = name.split(".", 3)
        rest = rest.replace("shared_head.", "transformer.shared_head.")
        return f"model.layers.{n_trunk + int(j)}.{rest}"
    return name


def write_checkpoint(path: Path, size_gb: float) -> tuple[int, int]:
    """Returns (total bytes, largest tensor bytes)."""
    layers = 2
    while True:
        cfg = bench_config(layers)
        shapes = expected_tensors(cfg)
        total = sum(4 * int(np.prod(s)) for _, s in shapes)
        if total >= size_gb * 1e9:
            break
        layers += 1
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    groups: dict[str, list] = {}
    for name, shape in shapes:
        key = hf_key(name, cfg["num_hidden_layers"])
        parts = key.split(".")
        group = parts[2] if parts[:2] == ["model", "layers"] else "other"
        groups.setdefault(group, []).append((key, shape))
    rng = np.random.default_rng(0)
    weight_map = {}
    names = sorted(groups, key=lambda g: (g == "other", int(g) if g.isdigit() else 0))
    for k, g in enumerate(names, start=1):
        fname = f"model-{k:05d}-of-{len(names):05d}.safetensors"
        entries = [(key, "F32", tuple(shape)) for key, shape in groups[g]]
        header, offsets = encode_header(entries, {"format": "pt"})
        w = ShardWriter(path / fname, header, sum(4 * int(np.prod(s)) for _, _, s in entries))
        for (key, _, shape), off in zip(entries, offsets):
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= np.float32(1 / np.sqrt(shape[-1])) if len(shape) > 1 else np.float32(0.1)
            w.write_at(off, a)
            del a
            weight_map[key] = fname
        w.commit()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    largest = max(4 * int(np.prod(s)) for _, s in shapes)
    return total, largest


CHILD = """
import sys, time
from step35_mlx.convert.quantize import convert_checkpoint
t = time.time()
convert_checkpoint(sys.argv[1], sys.argv[2], recipe="q4", shard_size=512 * 10**6, progress=False)
print(f"converted in {time.time() - t:.1f} s")
"""

BASELINE = "import mlx.core as mx, step35_mlx.convert.quantize; mx.eval(mx.zeros(1))"


def child_peak(args: list[str]) -> int:
    """Peak RSS in bytes of one child process (run alone, so RUSAGE_CHILDREN is its own)."""
    code = (
        "import resource, subprocess, sys, json\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'rc': p.returncode, 'maxrss': ru, 'out': p.stdout[-2000:], 'err': p.stderr[-4000:]}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if info["rc"] != 0:
        raise SystemExit(f"child failed:\n{info['err']}")
    if info["out"]:
        print(info["out"].strip())
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return info["maxrss"] * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/step35-convert-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and output")
    ap.add_argument("--real-dims", action="store_true", help="sparse bf16 checkpoint at the release's dimensions")
    args = ap.parse_args()
    src, out = args.dir / "src", args.dir / "out"
    shutil.rmtree(args.dir, ignore_errors=True)
    t = time.time()
    if args.real_dims:
        total, largest = write_sparse_checkpoint(src)
    else:
        total, largest = write_checkpoint(src, args.size_gb)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB {'bf16 (sparse)' if args.real_dims else 'float32'} in {len(list(src.glob('*.safetensors')))} shards, "
          f"largest tensor {largest / 1e6:.0f} MB, written in {time.time() - t:.1f} s (writer peak RSS "
          f"{own / 1e6:.0f} MB)")
    base = child_peak([sys.executable, "-c", BASELINE])
    peak = child_peak([sys.executable, "-c", CHILD, str(src), str(out)])
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    target = max(1e9, 3 * largest)
    print(f"output: {out_bytes / 1e9:.2f} GB (q4)")
    print(f"peak RSS of the converter: {peak / 1e6:.0f} MB (python + mlx baseline {base / 1e6:.0f} MB)")
    print(f"largest tensor: {largest / 1e6:.0f} MB; peak / largest = {peak / largest:.2f}x; "
          f"peak / checkpoint = {peak / total:.3f}")
    verdict = "PASS" if peak < target else "FAIL"
    print(f"{verdict}: target < {target / 1e6:.0f} MB (1 GB or 3x the largest tensor, whichever is larger)")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    if verdict == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    main()
