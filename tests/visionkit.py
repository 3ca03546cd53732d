"""Helpers shared by the vision tests: the golden two-image prompt and image-token ids."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from step35_mlx.vision.goldens import PROMPT_IMAGES, SPECIAL_IDS, prompt_text_ids
from step35_mlx.vision.processor import CropPlan, ProcessedImage
from step35_mlx.vision.inputs import expand
from step35_mlx.vision.prompt import ImageTokens, merge_features
from step35_mlx.vision.synthetic import synthetic_pixels

TOKENS = ImageTokens(*(SPECIAL_IDS[m] for m in ("<im_patch>", "<im_start>", "<im_end>", "<patch_start>",
                                                "<patch_end>", "<patch_newline>")))


def golden_prompt() -> tuple[list[ProcessedImage], list[int]]:
    """The logits golden's two images (seeded pixels) and its template ids (one placeholder each)."""
    images, ids = [], prompt_text_ids(0)
    for k, (n_crops, _) in enumerate(PROMPT_IMAGES):
        crops = synthetic_pixels(n_crops, 504, seed=20 + k) if n_crops else np.zeros((0, 3, 504, 504), np.float32)
        cols = 2 if n_crops else 0
        plan = CropPlan((1008, 1008), (1008, 1008), 504 if n_crops else 0, cols, n_crops // max(cols, 1), False)
        images.append(ProcessedImage(synthetic_pixels(1, 728, seed=10 + k)[0], crops, plan, f"seeded{k}"))
        ids += [TOKENS.im_patch] + prompt_text_ids(k + 1)
    return images, ids


def image_prompt_logits(model, images: list[ProcessedImage], template_ids: list[int]) -> tuple[list[int], np.ndarray]:
    """``(expanded ids, logits [T, V])`` of a prompt with images, in one uncached forward."""
    ids = expand(template_ids, images, TOKENS, 169, 81).ids
    tokens = mx.array([ids])
    feats = mx.concatenate([model.vision.image_features(im) for im in images])
    emb = merge_features(model.model.embed_tokens(tokens), tokens, feats, model.image_token_id)
    return ids, np.array(model(tokens, input_embeddings=emb).astype(mx.float32))[0]
