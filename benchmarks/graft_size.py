"""What `step35-mlx graft-mtp` downloads and writes for the real Step 3.5 Flash, from the bundled release config.

The release's index and headers cannot be read offline here, so the sizes come from the
config's tensor shapes (bf16 release; ``convert.graft.config_estimate``, the code the
``--dry-run`` falls back to). With network, ``step35-mlx graft-mtp DIR --dry-run`` reads the
real index and the headers of the shards holding the MTP tensors and prints the exact bytes.

Also runs that dry-run for real on a header-only stand-in of ``mlx-community/Step-3.5-Flash-4bit``
(the release config, mlx-lm's quantization block and an index of mlx-lm tensor names, no
shards) with ``HF_ENDPOINT`` pointing at a closed loopback port, so it prints the fallback.

    python benchmarks/graft_size.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from step35_mlx.config import ModelConfig  # noqa: E402
from step35_mlx.convert.graft import config_estimate  # noqa: E402
from step35_mlx.data import release_config  # noqa: E402
from step35_mlx.mlx_lm_format import mlx_lm_name  # noqa: E402
from step35_mlx.quant.recipes import expected_tensors, output_tensors, source_dtype_for, tensor_bytes, uniform  # noqa: E402


def main() -> None:
    raw = release_config()
    cfg = ModelConfig.from_dict(raw)
    total = sum(tensor_bytes(output_tensors(n, s, source_dtype_for(n), None)) for n, s in expected_tensors(cfg))
    print(f"release checkpoint (bf16, from config shapes): {total / 1e9:.1f} GB")
    for bits in (None, 8, 6, 4):
        est = config_estimate(cfg, uniform(bits) if bits else None)
        print(f"graft at {f'{bits}-bit g64' if bits else 'bf16 (float)':>13}: {est.tensors} tensors, "
              f"download {est.download_bytes / 1e9:.3f} GB ({100 * est.download_bytes / total:.2f} % of the release), "
              f"written {est.output_bytes / 1e9:.3f} GB")
    routers = [(n, s) for n, s in expected_tensors(cfg) if n.endswith(".moe.gate.weight")]
    est = config_estimate(cfg, uniform(4))
    print(f"--restore: {est.restore_tensors} tensors, {est.restore_bytes / 1e6:.1f} MB (the {len(routers)} float "
          f"routers {list(routers[0][1])} bf16: {sum(2 * s[0] * s[1] for _, s in routers) / 1e6:.1f} MB; the rest norms)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "Step-3.5-Flash-4bit"
        folder.mkdir()
        quant = {"group_size": 64, "bits": 4, "mode": "affine"}
        quant.update({f"model.layers.{i}.mlp.gate.gate": {"group_size": 64, "bits": 8} for i in sorted(cfg.moe_layers)})
        (folder / "config.json").write_text(json.dumps({**raw, "quantization": quant, "quantization_config": quant}))
        names = [mlx_lm_name(n) for n, _ in expected_tensors(cfg, mtp=False)]
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: "model-00001-of-00023.safetensors" for n in names}}))
        env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "step35_mlx", "graft-mtp", str(folder), "--dry-run", "--restore"]
        print("$ HF_ENDPOINT=http://127.0.0.1:9 step35-mlx graft-mtp Step-3.5-Flash-4bit --dry-run --restore")
        print(subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO).stdout.rstrip())


if __name__ == "__main__":
    main()
