"""Tuning: measurement agrees across modes, counts bytes, and the choice round-trips per model."""

import json

import mlx.core as mx
import pytest

from step35_mlx import load_model
from step35_mlx.costs import decode_step_bytes, expert_bytes, trunk_fixed_bytes
from step35_mlx.streams import MIN_SPLIT_BYTES, choose_streams, usable_cores
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint
from step35_mlx.tune import best, measure
from step35_mlx.tuned import TuneResult, load_choice, load_streams, save_choice


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config(num_layers=3, full_layers={0}, moe_layers={1, 2}, sliding_window=5, vocab_size=4,
                      hidden_size=32, head_dim=8)
    path = tmp_path_factory.mktemp("tune") / "ckpt"
    write_hf_checkpoint(path, cfg, seed=6)
    return path, load_model(path, dtype=mx.float32)


def test_measure_reports_every_mode_with_real_costs(tiny):
    path, model = tiny
    results = measure(model, [1, 2, 3, 0, 1, 2, 3, 0, 1], n_tokens=40)
    assert [r.depth for r in results] == [0, 1, 2, 3]
    plain = results[0]
    # plain decoding reads the fixed weights plus at most top_k experts per MoE layer per token
    moes = [l.moe for l in model.layers if l.is_moe]
    upper = trunk_fixed_bytes(model) + sum(2 * expert_bytes(m) for m in moes)
    lower = trunk_fixed_bytes(model) + sum(expert_bytes(m) for m in moes)
    assert lower <= plain.bytes_per_token <= upper
    # the static per-step estimate the CLI's two-stream default uses bounds the recorded cost
    assert plain.bytes_per_token <= decode_step_bytes(model) <= upper
    assert all(r.tokens_per_s > 0 for r in results)
    assert any(r.tokens_per_verify > 1.2 for r in results[1:])
    assert best(results) in results


def test_choice_round_trip_is_per_model(tiny, tmp_path):
    path, _ = tiny
    store = tmp_path / "tune.json"
    assert load_choice(path, store) is None
    save_choice(path, TuneResult(2, 10.0, 1e6, 2.1, [0.7, 0.5]), store)
    assert load_choice(path, store) == 2
    # a different config (same folder) is a different model
    cfg = json.loads((path / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(cfg))
    assert load_choice(other, store) is None
    assert load_streams(path, store) is None  # saved without a streams measurement
    save_choice(path, TuneResult(0, 10.0, 1e6, 1.0, []), store, streams=2)
    assert (load_choice(path, store), load_streams(path, store)) == (0, 2)


def test_streams_rule():
    """--streams wins, then what tune measured, then 2 on a multi-core CPU device; never 2 on a GPU."""
    if mx.default_device() != mx.cpu:
        assert choose_streams(None, 2) == 1
        with pytest.raises(ValueError, match="CPU device"):
            choose_streams(2)
        return
    assert choose_streams(1, 2) == 1 and choose_streams(2, 1) == 2
    assert choose_streams(None, 1) == 1 and choose_streams(None, 2) == 2
    two = 2 if usable_cores() >= 2 else 1
    assert choose_streams(None) == two
    # a model too small to pay for the handoffs stays on one stream unless tuned or asked
    assert choose_streams(None, None, MIN_SPLIT_BYTES - 1) == 1
    assert choose_streams(None, None, MIN_SPLIT_BYTES) == two
    assert choose_streams(None, 2, 1) == 2 and choose_streams(2, None, 1) == 2
    with pytest.raises(ValueError, match="1 or 2"):
        choose_streams(3)


def test_tune_command_stores_the_winner(tiny, tmp_path, monkeypatch):
    """End to end through the CLI on a checkpoint with a tokenizer (the chat fixture)."""
    from typer.testing import CliRunner

    import step35_mlx.tuned as tune_mod
    from step35_mlx.cli import app
    from chatkit import chat_model_dir

    store = tmp_path / "tune.json"
    monkeypatch.setattr(tune_mod, "TUNE_FILE", store)
    folder = chat_model_dir()
    r = CliRunner().invoke(app, ["tune", "--model", str(folder), "--tokens", "16", "--repeats", "1"])
    assert r.exit_code == 0, r.output
    assert "mtp d=1" in r.output and "default for this model is now" in r.output
    assert load_choice(folder, store) in (0, 1)
    if mx.default_device() == mx.cpu and usable_cores() >= 2:
        assert "tok/s on 1 CPU stream" in r.output
        assert load_streams(folder, store) in (1, 2)
    # and generation now follows the stored choice for this model
    from step35_mlx import load
    from step35_mlx.generate import resolve_settings

    model, tok = load(folder)
    expected = load_choice(folder)
    s = resolve_settings(model, tok)
    assert (s.mtp, s.draft_depth) == (bool(expected), expected or None)
