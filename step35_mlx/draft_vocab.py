"""Reduced draft vocabularies for MTP heads (frequency-ranked speculative sampling).

Each MTP module's own output head spans the whole vocabulary (128,896 rows on the
release: ~264 MB read per drafted token at 4 bits). Drafting only over the N most
frequent tokens reads N / V of that; the trunk still verifies with its full head, so
the output stays exactly plain decoding's and only acceptance can drop (a token outside
the N is never drafted). The ranking is counted from text with the model's tokenizer and
stored beside the weights as ``draft_vocab.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn

DRAFT_VOCAB_FILE = "draft_vocab.json"


@dataclass(frozen=True)
class DraftVocab:
    """Token ids in descending frequency (the source of the counts is recorded with them)."""

    ids: tuple[int, ...]
    source: str = ""
    size: int = 0  # the draft size chosen by measurement (0: none chosen)

    def top(self, n: int) -> mx.array:
        """The ``n`` most frequent ids, sorted by id (int32)."""
        if not 1 <= n <= len(self.ids):
            raise ValueError(f"draft vocabulary size must be in [1, {len(self.ids)}], got {n}")
        return mx.array(sorted(self.ids[:n]), dtype=mx.int32)


def rank_tokens(token_lists: Iterable[Sequence[int]], vocab_size: int, always: Sequence[int] = ()) -> list[int]:
    """All ids of the vocabulary by descending count in ``token_lists`` (ties: lower id first).

    ``always`` (e.g. eos and the think / tool tags) go first whatever their count.
    """
    counts: Counter[int] = Counter()
    for toks in token_lists:
        counts.update(int(t) for t in toks)
    head = list(dict.fromkeys(int(t) for t in always))
    rest = sorted((t for t in range(vocab_size) if t not in set(head)), key=lambda t: (-counts[t], t))
    return head + rest


def save_draft_vocab(folder: str | Path, ranked: Sequence[int], source: str, size: int) -> Path:
    """Write ``draft_vocab.json``: the ranking, where its counts came from, and the draft size to use."""
    if not 1 <= size <= len(ranked):
        raise ValueError(f"draft size must be in [1, {len(ranked)}], got {size}")
    path = Path(folder) / DRAFT_VOCAB_FILE
    path.write_text(json.dumps({"source": source, "size": int(size), "ranked_ids": [int(t) for t in ranked]}))
    return path


def load_draft_vocab(folder: str | Path) -> DraftVocab | None:
    """The folder's ``draft_vocab.json``, or ``None`` when it has none."""
    path = Path(folder) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return DraftVocab(ids=tuple(int(t) for t in data["ranked_ids"]), source=str(data.get("source", "")),
                      size=int(data.get("size", 0)))


def slice_rows(linear: nn.Module, ids: mx.array) -> nn.Module:
    """A copy of an (optionally quantized) ``Linear`` with only the output rows ``ids``.

    Quantization groups run along the input dimension, so whole rows slice exactly.
    """
    if isinstance(linear, nn.QuantizedLinear):
        out = nn.QuantizedLinear(linear.group_size, 1, bias=False, group_size=linear.group_size, bits=linear.bits,
                                 mode=getattr(linear, "mode", "affine"))
        out.weight = linear.weight[ids]
        out.scales = linear.scales[ids]
        if getattr(linear, "biases", None) is not None:
            out.biases = linear.biases[ids]
        elif "biases" in out:
            del out["biases"]
    elif isinstance(linear, nn.Linear):
        out = nn.Linear(1, 1, bias=False)
        out.weight = linear.weight[ids]
    else:
        raise TypeError(f"cannot slice rows of {type(linear).__name__}")
    if "bias" in linear:
        out.bias = linear.bias[ids]
    mx.eval(out.parameters())
    return out


def default_draft_ids(model: object) -> mx.array | None:
    """The draft ids stored with ``model``'s folder (``draft_vocab.json`` with a chosen size), else ``None``."""
    folder = getattr(model, "source_path", None)
    if folder is None:
        return None
    vocab = load_draft_vocab(folder)
    if vocab is None or not vocab.size or vocab.size >= getattr(model.config, "vocab_size", 0):
        return None
    return vocab.top(vocab.size)
