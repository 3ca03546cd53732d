"""Step 3.7 vision: processor, encoder + projector and image prompts against transformers' goldens.

Goldens come from ``scripts/make_vision_goldens.py`` (transformers' Step3p7 on the same seeded
checkpoint); the float64 reference is ``tests/vision_reference.py``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from step35_mlx.loader import load_model
from step35_mlx.vision.goldens import GOLDEN_CONFIG, PROCESSOR_SHAPES, logit_rows
from step35_mlx.vision.processor import CLIP_MEAN, CLIP_STD, CropPlan, ImageProcessor, ProcessedImage
from step35_mlx.vision.inputs import expand
from step35_mlx.vision.prompt import expansion
from step35_mlx.vision.synthetic import synthetic_pixels, sample_image, write_step3p7_checkpoint

from vision_reference import reference_image_tokens
from visionkit import TOKENS, golden_prompt, image_prompt_logits

DATA = Path(__file__).parent / "data"
STRIDE = 16


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def levels(x: np.ndarray) -> np.ndarray:
    mean = np.array(CLIP_MEAN, np.float64).reshape(3, 1, 1)
    std = np.array(CLIP_STD, np.float64).reshape(3, 1, 1)
    return np.rint((x.astype(np.float64) * std + mean) * 255.0)[:, ::STRIDE, ::STRIDE]


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("step3p7")
    weights = write_step3p7_checkpoint(path, GOLDEN_CONFIG, seed=0)
    return load_model(path, dtype=mx.float32, mtp=False), weights


@pytest.fixture(scope="module")
def processed():
    proc = ImageProcessor()
    return {(w, h): proc(sample_image(w, h, seed=w * 7 + h)) for w, h in PROCESSOR_SHAPES}


def test_crop_grid_and_token_count_match_transformers(processed):
    g = np.load(DATA / "vision_processor.npz")
    assert len(PROCESSOR_SHAPES) >= 8
    for (w, h), img in processed.items():
        key = f"{w}x{h}"
        assert img.num_crops == int(g[key + "/crops"]), key
        assert sum(img.newline_after(i) for i in range(img.num_crops)) == int(g[key + "/newlines"]), key
        assert len(expansion(img, TOKENS, 169, 81)) == int(g[key + "/tokens"]), key
    # the counts the architecture notes quote for the release processor
    assert len(expansion(processed[(1920, 1080)], TOKENS, 169, 81)) == 836
    assert len(expansion(processed[(4032, 3024)], TOKENS, 169, 81)) == 2665
    assert len(expansion(processed[(3024, 3024)], TOKENS, 169, 81)) == 3164


def test_pixels_match_transformers_within_one_level(processed):
    """Every 16th pixel of the global view and of the first and last crop within one 8-bit level."""
    g = np.load(DATA / "vision_processor.npz")
    for (w, h), img in processed.items():
        key = f"{w}x{h}"
        d = np.abs(levels(img.global_view) - g[key + "/global"])
        assert d.max() <= 1, (key, d.max())
        if img.num_crops:
            for name, crop in (("/crop_first", img.crops[0]), ("/crop_last", img.crops[-1])):
                d = np.abs(levels(crop) - g[key + name])
                assert d.max() <= 1, (key, name, d.max())


def test_processor_plan_rules():
    proc = ImageProcessor()
    assert proc.plan(728, 728).num_crops == 0
    p = proc.plan(200, 64)  # fits the global view but elongated: window = short side
    assert (p.window, p.cols, p.rows) == (64, 3, 1)
    p = proc.plan(20, 200)  # tiny and very elongated: square-padded first
    assert p.square_pad and p.num_crops == 0
    p = proc.plan(4032, 3024)  # downscaled to 3024 long side first
    assert p.global_size == (3024, 2268) and (p.cols, p.rows) == (6, 5)


def test_features_match_transformers_at_real_geometry(golden_model):
    model, _ = golden_model
    golden = np.load(DATA / "vision_features.npz")["features"]
    img = ProcessedImage(synthetic_pixels(1, 728, seed=1)[0], synthetic_pixels(2, 504, seed=2),
                         CropPlan((1008, 504), (1008, 504), 504, 2, 1, False), "seeded")
    ours = np.array(model.vision.image_features(img))
    assert ours.shape == golden.shape == (2 * 81 + 169, GOLDEN_CONFIG["text_config"]["hidden_size"])
    assert rel(ours, golden) <= 1e-4


def test_tower_matches_float64_reference(golden_model):
    model, weights = golden_model
    for side, seed in ((504, 3), (728, 4)):
        pixels = synthetic_pixels(1, side, seed=seed)
        ref = reference_image_tokens(weights, GOLDEN_CONFIG["vision_config"], pixels)
        ours = np.array(model.vision(mx.array(pixels)))
        assert rel(ours, ref) <= 1e-4, side


def test_two_image_prompt_logits_match_transformers(golden_model):
    model, _ = golden_model
    g = np.load(DATA / "vision_logits.npz")
    images, template_ids = golden_prompt()
    ids, logits = image_prompt_logits(model, images, template_ids)
    assert ids == g["ids"].tolist()
    tokens = mx.array([ids])
    rows = g["rows"]
    assert rows.tolist() == logit_rows(len(ids))
    assert rel(logits[rows], g["logits"]) <= 1e-4
    # the images matter: text-only embeddings at the same positions give other logits
    plain = np.array(model(tokens))[0]
    assert rel(plain[rows], g["logits"]) > 1e-2


def test_placeholder_count_mismatch_is_an_error():
    images, ids = golden_prompt()
    with pytest.raises(ValueError, match="2 image placeholder"):
        expand(ids, images[:1], TOKENS, 169, 81)
