"""A tiny chat checkpoint for the generation / session / CLI tests.

A random Step 3.5 model (``synthetic.tiny_config``, sliding window 8) plus a small
byte-level BPE tokenizer trained here with ``tokenizers`` on a few lines of text.
The tokenizer has the Step special tokens and ``tokenizer_config.json`` carries the
released chat template, so rendering, reasoning and tool tags go through the same
code paths as the real checkpoint. Built once per test process (cached).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from step35_mlx.data import CHAT_TEMPLATE
from step35_mlx.demo.corpus import SPECIAL_TOKENS
from step35_mlx.synthetic import random_hf_weights, tiny_config, write_hf_checkpoint

# The demo model's special-token order: bos 0, eos 1 / 2 / 4 (<|im_end|>).
EOS_IDS = [1, 2, 4]
VOCAB = 384  # embedding rows; >= the tokenizer size

_TEXT = """\
The quick brown fox jumps over the lazy dog. A list is a mutable sequence.
Tuples are immutable sequences, typically used to store collections of data.
def add(a, b):\n    return a + b\nThe weather in Paris is sunny today, 21 degrees.
Please call the function get_weather with the parameter city set to Paris.
<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>
Hello! How can I help you? I think the answer is 42. Let me think step by step.
user assistant system tool_response observation {"a": 1, "b": [1, 2, 3]} true false null
"""


def train_tokenizer(out_dir: Path, vocab_size: int = 360) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the tokenizer size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[2],
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE.read_text(),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return tok.get_vocab_size()


def write_chat_checkpoint(out_dir: Path, *, sliding_window: int = 8, mute_eos: bool = True,
                          generation_config: dict | None = None, **config_overrides) -> Path:
    """Random tiny model + trained tokenizer in ``out_dir``.

    ``mute_eos`` zeroes the LM-head rows of the eos ids so a greedy random model never
    stops by itself (answers run to ``max_tokens``, which the tests rely on).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = train_tokenizer(out_dir)
    assert size <= VOCAB, size
    cfg = tiny_config(vocab_size=VOCAB, sliding_window=sliding_window, num_layers=4, num_mtp=1,
                      hidden_size=64, head_dim=32, **config_overrides)  # head_dim 32: kv_bits group size 32 fits
    cfg["eos_token_id"] = list(EOS_IDS)
    cfg["bos_token_id"] = 0
    weights = random_hf_weights(cfg, seed=3)
    # A sharper head makes greedy choices far from ties (robust cross-path comparisons).
    weights["lm_head.weight"] = weights["lm_head.weight"] * np.float32(4.0)
    if mute_eos:
        weights["lm_head.weight"][EOS_IDS] = 0.0
    write_hf_checkpoint(out_dir, cfg, weights, num_shards=1)
    if generation_config is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(generation_config))
    return out_dir


@functools.lru_cache(maxsize=None)
def chat_model_dir() -> Path:
    """The shared fixture checkpoint folder (built once per process)."""
    root = Path(tempfile.mkdtemp(prefix="step35-chat-"))
    atexit.register(shutil.rmtree, root, True)
    return write_chat_checkpoint(root / "tiny-chat")


@functools.lru_cache(maxsize=None)
def chat_model():
    """``(model, tokenizer)`` of :func:`chat_model_dir`, loaded once (models are never mutated)."""
    import mlx.core as mx

    from step35_mlx import load

    return load(chat_model_dir(), dtype=mx.float32)
