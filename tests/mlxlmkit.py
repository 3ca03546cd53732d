"""A tiny bf16 Step 3.5 checkpoint in the release layout and its conversions by ``mlx_lm.convert`` itself.

Every dimension is a multiple of 64 so that every linear layer quantizes (MTP included).
Built once per test process (``conversions()``); tests copy a folder before changing it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import tempfile
from pathlib import Path

from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

DEMO = Path(__file__).resolve().parent.parent / "step35_mlx" / "demo" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# name -> mlx_lm.convert keyword arguments
VARIANTS = {
    "q4": dict(quantize=True, q_group_size=64, q_bits=4),
    "q8": dict(quantize=True, q_group_size=64, q_bits=8),
    "mixed_3_6": dict(quantize=True, quant_predicate="mixed_3_6"),
    "bf16": dict(),
}
CONFIG = tiny_config(hidden_size=128, head_dim=32, num_layers=4, intermediate_size=128, moe_intermediate_size=64,
                     share_expert_dim=64, vocab_size=2048, num_experts=8, top_k=2, sliding_window=8)


@functools.lru_cache(maxsize=None)
def conversions() -> dict[str, Path]:
    """``{"hf": original bf16 folder, "q4" | "q8" | "mixed_3_6" | "bf16": its mlx-lm conversion}``."""
    from mlx_lm import convert

    root = Path(tempfile.mkdtemp(prefix="step35-mlxlm-"))
    atexit.register(shutil.rmtree, root, True)
    hf = root / "hf"
    write_hf_checkpoint(hf, CONFIG, seed=5, dtype="bfloat16", num_shards=3)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, hf / name)
    out = {"hf": hf}
    for name, kwargs in VARIANTS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            convert(str(hf), str(root / name), **kwargs)
        out[name] = root / name
    return out


def copy_of(name: str, dest: Path) -> Path:
    shutil.copytree(conversions()[name], dest)
    return dest
