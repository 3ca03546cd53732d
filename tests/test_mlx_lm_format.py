"""mlx-lm / mlx-community conversions load as they are: logits and greedy tokens equal mlx-lm's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import rel_err, tokens_for
from mlxlmkit import CONFIG, VARIANTS, conversions, copy_of
from step35_mlx import CheckpointError, load_model
from step35_mlx.generate import ar_tokens
from step35_mlx.config import ModelConfig
from step35_mlx.mlx_lm_format import mlx_lm_name, original_name, read_folder, remote_config
from step35_mlx.plan import folder_weight_sizes, weight_sizes
from step35_mlx.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
T = 24  # > sliding window 8


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "step35_mlx", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture(scope="module")
def pairs():
    """name -> (our model, mlx-lm's model), both float32, from the same mlx-lm folder."""
    from mlx_lm import load as mlx_lm_load

    out = {}
    for name in VARIANTS:
        ours = load_model(conversions()[name], dtype=mx.float32)
        ref, _ = mlx_lm_load(str(conversions()[name]))
        ref.set_dtype(mx.float32)
        out[name] = (ours, ref)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_equal_mlx_lm(pairs, name):
    ours, ref = pairs[name]
    tokens = tokens_for(CONFIG["vocab_size"], T, seed=1)
    err = rel_err(ours(tokens), ref(tokens))
    assert err <= 1e-4, err
    assert ours.num_mtp == 0 and ours.config.num_nextn_predict_layers == 0  # config said 3: stale, corrected


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_tokens_equal_mlx_lm(pairs, name):
    from mlx_lm.generate import generate_step

    ours, ref = pairs[name]
    prompt = tokens_for(CONFIG["vocab_size"], 12, seed=2)[0]
    n = 20  # prompt + answer wrap the 8-slot sliding window
    theirs = [int(t) for t, _ in zip((t for t, _ in generate_step(prompt, ref, max_tokens=n)), range(n))]
    mine = []
    for t in ar_tokens(ours, ours.make_cache(), prompt, SamplingParams(temperature=0)):
        mine.append(t)
        if len(mine) == n:
            break
    assert mine == theirs


def test_norms_are_exactly_the_stored_value_minus_one():
    """The runtime multiplies by 1 + w; with w = s - 1 in float32 that is exactly the stored bf16 s."""
    folder = conversions()["q4"]
    stored = mx.load(str(folder / "model.safetensors"))
    model = load_model(folder, dtype=mx.float32)
    for key, w in [("model.norm.weight", model.model.norm.weight),
                   ("model.layers.1.self_attn.q_norm.weight", model.layers[1].self_attn.q_norm.weight),
                   ("model.layers.2.post_attention_layernorm.weight", model.layers[2].post_attention_layernorm.weight)]:
        s = stored[key]
        assert s.dtype == mx.bfloat16 and w.dtype == mx.float32
        np.testing.assert_array_equal(np.array(1.0 + w), np.array(s.astype(mx.float32)))
    # and it is zero-centred, as in the original (w drawn ~ N(0, 0.2^2))
    assert abs(float(model.model.norm.weight.mean())) < 0.1


def test_quantized_router_runs_in_float32():
    model = load_model(conversions()["q4"], dtype=mx.bfloat16)
    gate = model.layers[1].moe.gate
    assert gate.bits == 8 and gate.scales.dtype == mx.float32 and gate.biases.dtype == mx.float32
    x = mx.random.normal((1, 3, CONFIG["hidden_size"])).astype(mx.bfloat16)
    idx, w = model.layers[1].moe.route(x)
    assert w.dtype == mx.float32


def test_mixed_recipe_router_bits_and_null_group_size():
    folder = read_folder(conversions()["mixed_3_6"])
    assert folder.mlx_lm.router_bits == 3 and folder.mlx_lm.weight_bits == (3, 6)
    quant = folder.config.raw["quantization"]
    assert quant["model.layers.1.moe.gate"] == {"group_size": 64, "bits": 3, "mode": "affine"}  # null made explicit
    assert "quantization_config" not in folder.config.raw


def test_name_mapping_round_trips():
    for ours, theirs in [("model.layers.3.moe.gate_proj.weight", "model.layers.3.mlp.switch_mlp.gate_proj.weight"),
                         ("model.layers.3.moe.gate.scales", "model.layers.3.mlp.gate.gate.scales"),
                         ("model.layers.3.moe.router_bias", "model.layers.3.mlp.gate.router_bias"),
                         ("model.layers.3.share_expert.up_proj.weight", "model.layers.3.mlp.share_expert.up_proj.weight"),
                         ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight")]:
        assert mlx_lm_name(ours) == theirs and original_name(theirs) == ours and original_name(ours) == ours


def test_info_plan_and_generate_on_an_mlx_lm_folder():
    folder = conversions()["q4"]
    r = cli("info", str(folder))
    assert r.returncode == 0, r.stderr
    assert "0 MTP layers" in r.stdout and "mlx-lm conversion (4-bit)" in r.stdout
    assert "graft-mtp" in r.stdout and "8-bit router" in r.stdout
    r = cli("plan", "--model", str(folder))
    assert r.returncode == 0, r.stderr
    assert "mlx-lm 4-bit" in r.stdout
    r = cli("generate", "--model", str(folder), "--prompt", "hello", "--max-tokens", "4", "--temperature", "0",
            env={"HF_HUB_OFFLINE": "1"})  # a local folder: nothing to ask the Hub
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("is an mlx-lm conversion (4-bit); without its 3 MTP heads") == 1


def test_truncated_shard_is_a_clear_error(tmp_path):
    folder = copy_of("q4", tmp_path / "q4")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(folder)
    r = cli("generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "2")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def _rewrite(folder: Path, fn) -> None:
    shard = folder / "model.safetensors"
    tensors = fn(dict(mx.load(str(shard))))
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "model.safetensors" for k in sorted(tensors)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_half_converted_folder_is_a_clear_error(tmp_path):
    folder = copy_of("bf16", tmp_path / "half")
    # layer 2 back under the original names, as if a conversion had stopped half-way
    _rewrite(folder, lambda t: {(original_name(k) if ".layers.2." in k else k): v for k, v in t.items()})
    with pytest.raises(CheckpointError, match="half-converted"):
        load_model(folder)
    r = cli("info", str(folder))
    assert r.returncode == 2 and "half-converted" in r.stderr and "Traceback" not in r.stderr


def test_missing_expert_tensor_is_named(tmp_path):
    folder = copy_of("q4", tmp_path / "missing")
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.3.mlp.switch_mlp.up_proj")})
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.3\.moe\.up_proj"):
        load_model(folder)


def test_unrecorded_mtp_tensors_are_refused(tmp_path):
    folder = copy_of("bf16", tmp_path / "stray")
    _rewrite(folder, lambda t: {**t, "model.mtp.0.enorm.weight": mx.zeros((CONFIG["hidden_size"],))})
    with pytest.raises(CheckpointError, match="graft-mtp did not record"):
        load_model(folder)


@pytest.mark.parametrize("name", ["q4", "mixed_3_6"])
def test_plan_from_a_repo_config_alone_matches_the_files(name):
    """``plan --model REPO`` sees only config.json: corrected, it predicts the folder's real weight bytes."""
    raw = json.loads((conversions()[name] / "config.json").read_text())
    fixed = remote_config(raw)
    cfg = ModelConfig.from_dict(fixed)
    assert cfg.num_nextn_predict_layers == 0 and raw["num_nextn_predict_layers"] == 3
    computed = weight_sizes(cfg, fixed["quantization"])
    measured = folder_weight_sizes(conversions()[name], dtype_bytes=None)
    assert computed.mtp == measured.mtp == 0
    assert abs(computed.trunk - measured.trunk) / measured.trunk < 0.01
