"""Step 3.7 vision tensors through the loader, the converter and verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from step35_mlx.convert.quantize import convert_checkpoint
from step35_mlx.convert.verify import verify
from step35_mlx.loader import load_model
from step35_mlx.quant.recipes import expected_tensors, get_recipe, plan_sizes, with_vision_bits
from step35_mlx.vision.goldens import GOLDEN_CONFIG, prompt_text_ids
from step35_mlx.vision.synthetic import synthetic_pixels, write_step3p7_checkpoint

from visionkit import TOKENS, golden_prompt, image_prompt_logits

REPO = Path(__file__).resolve().parents[1]
# Stated bound for --vision-bits 8: mean KL(float-vision || 8-bit-vision) of the next-token
# distributions over a one-image prompt. Measured 0.0047 nats on this fixture (width 32, so group
# size 32 and random weights: a harsher case than the 1536-wide release).
VISION_Q8_KL = 0.02


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "step35_mlx", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "step37"
    write_step3p7_checkpoint(path, GOLDEN_CONFIG, seed=0, dtype="bfloat16")
    return path


def test_both_key_prefixes_load_the_same_tower(tmp_path, source):
    other = tmp_path / "prefixed"
    write_step3p7_checkpoint(other, GOLDEN_CONFIG, seed=0, dtype="bfloat16", vision_prefix="model.vision_model.")
    keys = json.loads((other / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.vision_model.conv1.weight" in keys and "model.vit_large_projector.weight" in keys
    px = mx.array(synthetic_pixels(1, 504, seed=7))
    a = load_model(source, dtype=mx.float32, mtp=False)
    b = load_model(other, dtype=mx.float32, mtp=False)
    assert np.array_equal(np.array(a.vision(px)), np.array(b.vision(px)))
    assert not hasattr(load_model(source, dtype=mx.float32, mtp=False, vision=False), "vision")


def test_expected_tensors_and_sizes_count_the_tower():
    names = dict(expected_tensors(GOLDEN_CONFIG))
    vision = {k: v for k, v in names.items() if k.startswith("vision.")}
    D, L = 32, 2
    assert vision["vision.encoder.patch_embed.weight"] == (D, 3 * 14 * 14)
    assert vision["vision.projector.down2.linear.weight"] == (4 * D, 2 * D * 9)
    assert len(vision) == 4 + 14 * L + 4 + 1  # the release: 4 + 14 * 47 + 4 = 666, + the projector
    sizes = plan_sizes(GOLDEN_CONFIG, get_recipe("q4"))
    params = sum(int(np.prod(s)) for s in vision.values())
    assert sizes["vision"] == 2 * params  # bf16, not quantized by default
    assert not any(k.startswith("vision.") for k, _ in expected_tensors(GOLDEN_CONFIG, vision=False))


def test_convert_keeps_the_tower_bf16_and_verify_counts_it(tmp_path, source):
    out = tmp_path / "q8"
    convert_checkpoint(source, out, recipe="q8", progress=False)
    rep = verify(out)
    assert rep.ok, rep.summary()
    assert rep.vision_tensors == 37
    src = load_model(source, dtype=mx.float32, mtp=False)
    conv = load_model(out, dtype=mx.float32, mtp=False)
    px = mx.array(synthetic_pixels(1, 728, seed=8))
    assert np.array_equal(np.array(src.vision(px)), np.array(conv.vision(px)))


def test_vision_bits_8_within_stated_kl(tmp_path, source):
    float_out, q_out = tmp_path / "float_vision", tmp_path / "q8_vision"
    convert_checkpoint(source, float_out, recipe="q8", progress=False)
    convert_checkpoint(source, q_out, recipe=with_vision_bits(get_recipe("q8"), 8), progress=False)
    assert verify(q_out).ok
    images, _ = golden_prompt()
    images, ids = images[1:], prompt_text_ids(0) + [TOKENS.im_patch] + prompt_text_ids(1)
    _, a = image_prompt_logits(load_model(float_out, dtype=mx.float32, mtp=False), images, ids)
    _, b = image_prompt_logits(load_model(q_out, dtype=mx.float32, mtp=False), images, ids)
    la = a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
    lb = b - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True)) - b.max(-1, keepdims=True)
    kl = float((np.exp(la) * (la - lb)).sum(-1).mean())
    print(f"KL(float || q8 vision) = {kl:.3g}")
    assert 0 < kl <= VISION_Q8_KL


def test_convert_cli_vision_options(tmp_path, source):
    out = tmp_path / "cli"
    r = _cli("convert", str(source), "--out", str(out), "--recipe", "q8", "--no-vision", "-q")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert "vision_config" not in cfg and cfg["model_type"] == "step3p7"
    r = _cli("verify", str(out))
    assert r.returncode == 0 and "vision tower" not in r.stdout
    r = _cli("convert", str(source), "--out", str(tmp_path / "bad"), "--vision-bits", "5", "-q")
    assert r.returncode == 2 and "error:" in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def test_plan_counts_the_tower_and_image_encoding(tmp_path, source):
    from step35_mlx.plan import folder_weight_sizes, plan_memory, weight_sizes
    from step35_mlx.vision.config import VisionConfig
    from step35_mlx.vision.costs import view_cost

    params = sum(int(np.prod(s)) for k, s in expected_tensors(GOLDEN_CONFIG) if k.startswith("vision."))
    assert weight_sizes(GOLDEN_CONFIG, "q4").vision == 2 * params  # kept bf16 by the recipes
    assert folder_weight_sizes(source).vision == 2 * params  # the bf16 source folder, raw names
    out = tmp_path / "q4"
    convert_checkpoint(source, out, recipe="q4", progress=False)
    assert folder_weight_sizes(out).vision == 2 * params  # converted names, still bf16
    # CPU plan (unfused attention, float32): one 728 view's scores dominate this tiny text model's prefill
    vcfg = VisionConfig.from_config(GOLDEN_CONFIG)
    view = view_cost(vcfg, 728, 4, fused_attention=False)
    plan = plan_memory(GOLDEN_CONFIG, context=64, activation_dtype_bytes=4, fused_attention=False)
    assert plan.activations == view.activation_bytes >= vcfg.num_heads * 2704**2 * 4
    assert plan.activation_detail["phase"] == "image encoding"


def test_release_tower_size_and_flops():
    from step35_mlx.vision.config import VisionConfig
    from step35_mlx.vision.costs import view_cost

    cfg = VisionConfig()  # the released geometry
    D, F, N = 1536, 8960, 52 * 52
    per_layer = 2 * N * (4 * D * D + 2 * D * F) + 4 * N * N * D
    view = view_cost(cfg, 728)
    assert view.tokens == 169 and view_cost(cfg, 504).tokens == 81
    assert abs(view.flops - 47 * per_layer) / view.flops < 0.02  # the blocks are 98% of the work
    assert 11.6e12 < view.flops < 11.7e12
