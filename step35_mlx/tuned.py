"""Where ``step35-mlx tune`` keeps its winner per model and device, and how generation reads it back.

Kept apart from :mod:`step35_mlx.tune` (which measures, and so imports the decoding loops) so
that :mod:`step35_mlx.generate` can read the stored choice without importing the measuring code.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

TUNE_FILE = Path.home() / ".cache" / "step35-mlx" / "tune.json"


@dataclass
class TuneResult:
    depth: int  # 0 = plain decoding
    tokens_per_s: float
    bytes_per_token: float
    tokens_per_verify: float
    acceptance: list[float]

    @property
    def mode(self) -> str:
        return f"mtp d={self.depth}" if self.depth else "plain"


def model_key(path: str | Path) -> str:
    """Identity of a model on this device: folder, config.json hash, MLX device."""
    path = Path(path).resolve()
    digest = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    return f"{path}|{digest}|{mx.default_device()}"


def _read(store: Path) -> dict:
    try:
        data = json.loads(store.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def save_choice(path: str | Path, result: TuneResult, store: Path | None = None, streams: int | None = None) -> None:
    """Record the winner for this model (atomic write) in ``store`` (default ``TUNE_FILE``).

    ``streams``: the CPU stream count that decoded faster here (1 or 2), when it was measured.
    """
    store = store or TUNE_FILE
    data = _read(store)
    entry = {**asdict(result), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    if streams is not None:
        entry["streams"] = streams
    data[model_key(path)] = entry
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, store)


def load_choice(path: str | Path, store: Path | None = None) -> int | None:
    """The tuned draft depth for this model (0 = plain decoding), or None if never tuned here."""
    entry = _read(store or TUNE_FILE).get(model_key(path))
    depth = entry.get("depth") if isinstance(entry, dict) else None
    return depth if isinstance(depth, int) and not isinstance(depth, bool) and 0 <= depth <= 3 else None


def load_streams(path: str | Path, store: Path | None = None) -> int | None:
    """The CPU stream count ``tune`` measured faster for this model here (1 or 2), or None if not measured."""
    entry = _read(store or TUNE_FILE).get(model_key(path))
    streams = entry.get("streams") if isinstance(entry, dict) else None
    return streams if streams in (1, 2) and not isinstance(streams, bool) else None
