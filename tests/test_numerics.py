"""Float32 logits against an independent float64 NumPy reference and against mlx-lm's step3p5.

Configs deliberately differ from the release pattern: full attention off the i % 4 grid,
dense layers in the middle, clamps that bind, a small llama3 ``original_max_position_embeddings``
so the scaling changes results at test lengths, and windows shorter than the sequence.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from step35_mlx import load_model
from step35_mlx.synthetic import tiny_config
from reference import reference_hidden, reference_logits

from conftest import rel_err

MARGIN = 1e-5
TOL = 1e-4

CONFIGS = {
    "mixed": (tiny_config(num_layers=6, full_layers={1, 4}, moe_layers={0, 2, 3, 5}, sliding_window=6,
                          swiglu_limits=[0, 0, 0.8, 0, 0, 0.8], swiglu_limits_shared=[1.0, 0, 0, 1.0, 0, 0]), 32),
    "gqa1-clamped": (dict(tiny_config(num_layers=5, full_layers={2, 3}, moe_layers={1, 4}, kv_heads=1, sliding_heads=8,
                                      full_heads=2, num_experts=12, top_k=3, sliding_window=5,
                                      swiglu_limits=[0.5] * 5, swiglu_limits_shared=[0.5] * 5), rms_norm_eps=1e-6), 40),
    "release-pattern": (tiny_config(num_layers=8, sliding_window=7, original_max_position_embeddings=16), 36),
}


def _tokens(cfg, T, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.get("vocab_size", 256), size=T).astype(np.int32)


def _kept_rows(margin):
    keep = margin > MARGIN
    return keep, int((~keep).sum())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    from step35_mlx.synthetic import write_hf_checkpoint

    cfg, T = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    weights = write_hf_checkpoint(path, cfg, seed=11)
    return request.param, path, cfg, weights, _tokens(cfg, T)


def test_logits_match_float64_reference(case):
    name, path, cfg, weights, toks = case
    model = load_model(path, dtype=mx.float32)
    ref, margin = reference_logits(cfg, weights, toks)
    ours = np.array(model(mx.array(toks)[None]))[0]
    keep, excluded = _kept_rows(margin)
    assert excluded <= len(toks) // 4, f"{name}: {excluded} near-tie rows excluded"
    err = rel_err(ours[keep], ref[keep])
    assert err <= TOL, f"{name}: rel err {err:.2e} ({excluded} near-tie rows excluded)"
    # The reference really constrains the model: a visible error if the +1 norm shift is dropped.
    assert np.abs(ref).max() > 0.5


def test_forward_hidden_is_pre_norm(case):
    name, path, cfg, weights, toks = case
    model = load_model(path, dtype=mx.float32)
    ref, margin = reference_hidden(cfg, weights, toks)
    ours = np.array(model.forward_hidden(mx.array(toks)[None]))[0]
    keep, _ = _kept_rows(margin)
    assert rel_err(ours[keep], ref[keep]) <= TOL


def _mlx_lm_model(cfg, weights):
    from mlx_lm.models.step3p5 import Model as LmModel, ModelArgs

    m = LmModel(ModelArgs.from_dict(cfg))
    m.load_weights(list(m.sanitize({k: mx.array(v) for k, v in weights.items()}).items()))
    mx.eval(m.parameters())
    return m


def test_logits_match_mlx_lm(case):
    name, path, cfg, weights, toks = case
    model = load_model(path, dtype=mx.float32)
    theirs = np.array(_mlx_lm_model(cfg, weights)(mx.array(toks)[None]))[0]
    ours = np.array(model(mx.array(toks)[None]))[0]
    _, margin = reference_logits(cfg, weights, toks)
    keep, excluded = _kept_rows(margin)
    assert rel_err(ours[keep], theirs[keep]) <= TOL, f"{name}: {excluded} near-tie rows excluded"


def test_bf16_and_step37_checkpoints_load_to_the_same_model(make_checkpoint):
    cfg = tiny_config(num_layers=4, full_layers={0, 3}, sliding_window=5)
    path, _, weights = make_checkpoint("bf16", cfg, dtype="bfloat16", seed=5)
    toks = _tokens(cfg, 24)
    ref, margin = reference_logits(cfg, weights, toks)  # weights as stored, after bf16 rounding
    keep, _ = _kept_rows(margin)
    model = load_model(path, dtype=mx.float32)
    assert rel_err(np.array(model(mx.array(toks)[None]))[0][keep], ref[keep]) <= TOL

    cfg37 = tiny_config(num_layers=4, full_layers={0, 3}, sliding_window=5, model_type="step3p7")
    path37, _, _ = make_checkpoint("s37", cfg37, weights=weights)
    model37 = load_model(path37, dtype=mx.float32)
    a = np.array(model37(mx.array(toks)[None]))[0]
    assert rel_err(a[keep], ref[keep]) <= TOL


def test_bf16_activations_track_float32():
    """bf16 end to end is a different numeric regime; it must stay close, not exact."""
    cfg = tiny_config(num_layers=3, full_layers={0}, moe_layers={1, 2}, sliding_window=6)
    import tempfile
    from pathlib import Path

    from step35_mlx.synthetic import write_hf_checkpoint

    with tempfile.TemporaryDirectory() as d:
        write_hf_checkpoint(Path(d), cfg, dtype="bfloat16", seed=2)
        m32 = load_model(d, dtype=mx.float32)
        m16 = load_model(d, dtype=mx.bfloat16)
        assert load_model(d).lm_head.weight.dtype == (mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)
        assert m16.lm_head.weight.dtype == mx.bfloat16
        assert m16.layers[1].moe.gate.weight.dtype == mx.float32  # need_fp32_gate
        assert m16.layers[1].moe.router_bias.dtype == mx.float32
        toks = mx.array(_tokens(cfg, 20))[None]
        a, b = m32(toks), m16(toks)
        assert b.dtype == mx.bfloat16
        assert (np.array(mx.argmax(a, -1)) == np.array(mx.argmax(b, -1))).mean() > 0.8
