"""How a model folder's MTP modules draft: ``draft.json`` beside the weights.

Every setting here changes only what is drafted, never the output (the trunk verifies):
``head_bits`` / ``layer_bits`` requantize the MTP modules at load
(:mod:`step35_mlx.draft_quant`), ``min_confidence`` gates the draft length
(:mod:`step35_mlx.draft_gate`). They are chosen by measurement
(``benchmarks/bench_draft_levers.py``, which also writes the file) and then apply to
every command that loads the folder. The reduced draft vocabulary has its own file
(``draft_vocab.json``, :mod:`step35_mlx.draft_vocab`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .draft_quant import DRAFT_BITS

DRAFT_CONFIG_FILE = "draft.json"


@dataclass(frozen=True)
class DraftConfig:
    """Affine bits of the MTP heads and of the rest of the modules (``None``: as stored), and the gate."""

    head_bits: int | None = None
    layer_bits: int | None = None
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        for name in ("head_bits", "layer_bits"):
            bits = getattr(self, name)
            if bits is not None and (isinstance(bits, bool) or bits not in DRAFT_BITS):
                raise ValueError(f"{name} must be one of {', '.join(map(str, DRAFT_BITS))}, got {bits!r}")
        if isinstance(self.min_confidence, bool) or not isinstance(self.min_confidence, (int, float)) \
                or not (math.isfinite(self.min_confidence) and 0 <= self.min_confidence < 1):
            raise ValueError(f"min_confidence must be a number in [0, 1), got {self.min_confidence!r}")


def save_draft_config(folder: str | Path, config: DraftConfig) -> Path:
    """Write ``draft.json`` into ``folder``."""
    path = Path(folder) / DRAFT_CONFIG_FILE
    path.write_text(json.dumps(asdict(config)) + "\n")
    return path


def load_draft_config(folder: str | Path | None) -> DraftConfig:
    """The folder's ``draft.json`` (defaults when it has none); ``ValueError`` naming the file when malformed."""
    path = Path(folder) / DRAFT_CONFIG_FILE if folder is not None else None
    if path is None or not path.is_file():
        return DraftConfig()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        unknown = sorted(set(data) - {"head_bits", "layer_bits", "min_confidence"})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        return DraftConfig(**data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid draft setting: {e}") from None


def stored_gate(model: object) -> float:
    """``min_confidence`` of ``model``'s folder (``draft.json``; 0 = no gate), read once per model, not per call."""
    gate = getattr(model, "_draft_gate", None)
    if gate is None:
        gate = load_draft_config(getattr(model, "source_path", None)).min_confidence
        model._draft_gate = gate
    return gate
