"""Loader: real HF layout (shards, index, fused experts, MTP, Step 3.7 prefixes) and every error path."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from step35_mlx import CheckpointError, load, load_model
from step35_mlx.loader import hf_to_internal
from step35_mlx.synthetic import tiny_config

CFG = tiny_config(num_layers=3, full_layers={0}, moe_layers={1, 2}, sliding_window=4)


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def _rewrite_shard(path, fn):
    """Apply ``fn(dict) -> dict`` to the tensors of the shard holding layer 1's q_proj; keep the index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    fname = index["weight_map"]["model.layers.1.self_attn.q_proj.weight"]
    tensors = dict(mx.load(str(path / fname)))
    mx.save_safetensors(str(path / fname), fn(tensors), metadata={"format": "pt"})
    return fname


def test_mtp_weights_are_loaded_not_dropped(make_checkpoint):
    path, cfg, weights = make_checkpoint(config=CFG)
    model = load_model(path, dtype=mx.float32)
    assert len(model.model.mtp) == 3
    for j in range(3):
        L = cfg["num_hidden_layers"] + j
        for hf, ours in [
            (f"model.layers.{L}.eh_proj.weight", model.model.mtp[j].eh_proj.weight),
            (f"model.layers.{L}.transformer.shared_head.output.weight", model.model.mtp[j].shared_head.output.weight),
            (f"model.layers.{L}.enorm.weight", model.model.mtp[j].enorm.weight),
            (f"model.layers.{L}.self_attn.q_proj.weight", model.model.mtp[j].self_attn.q_proj.weight),
        ]:
            np.testing.assert_array_equal(np.array(ours), weights[hf])
    np.testing.assert_array_equal(np.array(model.layers[1].moe.gate_proj.weight), weights["model.layers.1.moe.gate_proj.weight"])
    np.testing.assert_array_equal(np.array(model.layers[2].share_expert.down_proj.weight),
                                  weights["model.layers.2.share_expert.down_proj.weight"])


def test_key_mapping():
    n = 45
    assert hf_to_internal("model.layers.46.transformer.shared_head.output.weight", n) == "model.mtp.1.shared_head.output.weight"
    assert hf_to_internal("model.language_model.layers.3.moe.router_bias", n) == "model.layers.3.moe.router_bias"
    assert hf_to_internal("language_model.model.layers.45.enorm.weight", n) == "model.mtp.0.enorm.weight"
    assert hf_to_internal("language_model.lm_head.weight", n) == "lm_head.weight"
    assert hf_to_internal("model.vision_model.blocks.0.attn.weight", n) is None
    assert hf_to_internal("model.mtp.2.hnorm.weight", n) == "model.mtp.2.hnorm.weight"  # idempotent


def test_missing_tensor_is_named(make_checkpoint):
    path, _, _ = make_checkpoint(config=CFG)
    _rewrite_shard(path, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.q_proj.weight"})
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.q_proj.weight"):
        load_model(path)


def test_unexpected_and_misshaped_tensors_are_named(make_checkpoint):
    path, _, _ = make_checkpoint(config=CFG)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    def add(t):
        t["model.layers.1.self_attn.bogus.weight"] = mx.zeros((2, 2))
        t["model.layers.1.self_attn.q_proj.weight"] = mx.zeros((3, 3))
        return t

    fname = _rewrite_shard(path, add)
    index["weight_map"]["model.layers.1.self_attn.bogus.weight"] = fname
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "unexpected tensor(s): model.layers.1.self_attn.bogus.weight" in msg
    assert "model.layers.1.self_attn.q_proj.weight: checkpoint (3, 3)" in msg


def test_missing_truncated_and_mismatched_shards(make_checkpoint):
    path, _, _ = make_checkpoint(config=CFG)
    first = _shards(path)[0]
    backup = first.read_bytes()
    first.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{first.name}"):
        load_model(path)
    first.write_bytes(backup[: len(backup) // 2])
    with pytest.raises(CheckpointError, match=f"{first.name}.*truncated or corrupt"):
        load_model(path)
    first.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)
    first.write_bytes(backup)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k, f in index["weight_map"].items() if f != first.name)
    index["weight_map"][key] = first.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"says tensor {key}"):
        load_model(path)
    index_path.write_text("{broken")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_model(path)


def test_folder_and_config_errors(make_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps(CFG))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(empty)
    path, cfg, _ = make_checkpoint(config=CFG)
    bad = dict(cfg, num_attention_groups=3)
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="num_attention_heads"):
        load_model(path)
    # config says fewer layers than the files hold -> the extra layer's tensors are unexpected
    (path / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=2)))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(path)


def test_partly_mlx_lm_renamed_checkpoint_is_refused(make_checkpoint):
    """Whole mlx-lm conversions load (tests/test_mlx_lm_format.py); a mix of both namings does not."""
    path, _, _ = make_checkpoint(config=CFG)
    _rewrite_shard(path, lambda t: {k.replace(".moe.gate_proj.", ".mlp.switch_mlp.gate_proj."): v for k, v in t.items()})
    (path / "model.safetensors.index.json").unlink()  # shards are then found by glob
    with pytest.raises(CheckpointError, match="half-converted"):
        load_model(path)


def test_load_without_tokenizer_says_so(make_checkpoint):
    path, _, _ = make_checkpoint(config=CFG)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load(path)
