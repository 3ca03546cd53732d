"""Shared fixtures: tiny real-layout checkpoints and helpers to compare logits."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from step35_mlx.synthetic import tiny_config, write_hf_checkpoint


def rel_err(a, b) -> float:
    """max|a - b| / max|b| in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """``make_checkpoint(name, config=None, **write_kwargs) -> (path, config, weights)``."""

    def make(name: str = "ckpt", config: dict | None = None, **kwargs):
        cfg = config if config is not None else tiny_config()
        path = tmp_path / name
        weights = write_hf_checkpoint(path, cfg, **kwargs)
        return path, cfg, weights

    return make


def tokens_for(vocab: int, T: int, seed: int = 0, batch: int | None = None) -> mx.array:
    rng = np.random.RandomState(seed)
    shape = (batch or 1, T)
    return mx.array(rng.randint(0, vocab, size=shape).astype(np.int32))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes on the CPU test machine; runs with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
