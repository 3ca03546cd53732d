"""A small chat checkpoint with a 64K context, for prompts of 30K+ tokens (issue 13).

The release's layout scaled down: 3:1 sliding / full attention (layer 0 full, 1-3 sliding, the MTP
layer sliding), full layers with partial RoPE 0.5, theta 5e6 and llama3 scaling (factor 2 over half
the context: 32768 of 65536, as 131072 of 262144), sliding layers theta 1e4 with a window of 128 (the
release's 512 / 262144 of the context). One full-attention head (GQA 2:1 on the sliding layers): on
MLX's CPU build a prompt's cost is the full layer's T^2 attention, so heads are what a test pays for.
The tokenizer is the chat tests' byte-level BPE with the released chat template (``chatkit``).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from chatkit import write_chat_checkpoint

CONTEXT = 65536
WORDS = ("the quick brown fox jumps over lazy dog list is mutable sequence tuples are immutable "
         "typically used to store collections of data weather in Paris sunny today degrees please "
         "call function get_weather with parameter city set hello how can help you think answer "
         "let me step by user assistant system tool_response observation true false null").split()


def write_long_checkpoint(out_dir: Path) -> Path:
    """The long-context chat checkpoint in ``out_dir`` (config.json, one shard, tokenizer)."""
    return write_chat_checkpoint(out_dir, sliding_window=128, max_position_embeddings=CONTEXT,
                                 original_max_position_embeddings=CONTEXT // 2, rope_factor=2.0,
                                 full_heads=1, sliding_heads=2, kv_heads=1)


@functools.lru_cache(maxsize=None)
def long_model_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="step35-long-"))
    atexit.register(shutil.rmtree, root, True)
    return write_long_checkpoint(root / "tiny-long")


def long_text(tokenizer, tokens: int, seed: int) -> str:
    """Seeded prose of about ``tokens`` tokens: sentences of random words, cut at a token."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=tokens)  # a word is at least one token
    ends = set(np.cumsum(rng.integers(6, 16, size=tokens)).tolist())
    text = "".join(w + (". " if i in ends else " ") for i, w in enumerate(words, start=1))
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:tokens]).strip()
