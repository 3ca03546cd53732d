"""Images through stream_generate and ChatSession: chunked prefill, MTP, prefix reuse keyed on pixels."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from step35_mlx import ChatSession, stream_generate
from step35_mlx.loader import load
from step35_mlx.vision.inputs import FeatureCache, prepare
from step35_mlx.vision.prompt import merge_features
from step35_mlx.vision.synthetic import (
    sample_image, step3p7_config, tiny_vision_config, write_step3p7_checkpoint, write_vision_tokenizer,
)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm")
    ids = write_vision_tokenizer(path)
    # patch 28: a 26x26 grid per 728 view (49 image tokens, 25 per crop) keeps these tests fast
    cfg = step3p7_config(tiny_vision_config(width=16, layers=1, patch_size=28), image_token_id=ids["<im_patch>"],
                         vocab_size=2056, num_mtp=1, num_layers=4)
    write_step3p7_checkpoint(path, cfg, seed=3)
    model, tok = load(path, dtype=mx.float32)
    return model, tok


def _msgs(image, text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _greedy_uncached(model, tok, messages, n):
    """Greedy tokens from full uncached forwards over the expanded prompt (features merged once)."""
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True))
    prompt = prepare(model, tok, messages, ids).images
    feats = mx.concatenate([model.vision.image_features(im) for im in prompt.images])
    seq, out = list(prompt.ids), []
    for _ in range(n):
        t = mx.array([seq])
        emb = merge_features(model.model.embed_tokens(t), t, feats, model.image_token_id)
        nxt = int(mx.argmax(model(t, input_embeddings=emb)[0, -1]).item())
        out.append(nxt)
        seq.append(nxt)
    return out


GLOBAL, CROP = 49, 25  # image tokens per 728 view / 504 crop at patch 28


@pytest.fixture(scope="module")
def wide_image_reference(vlm):
    model, tok = vlm
    msgs = _msgs(sample_image(300, 120, seed=1))
    return msgs, _greedy_uncached(model, tok, msgs, 4)


@pytest.mark.parametrize("mtp", [False, True])
def test_stream_generate_with_image_matches_uncached_greedy(vlm, wide_image_reference, mtp):
    model, tok = vlm
    msgs, want = wide_image_reference
    assert model.vision.config.tokens_per_view(728) == GLOBAL and model.vision.config.tokens_per_view(504) == CROP
    got = []
    for chunk in stream_generate(model, tok, msgs, max_tokens=4, temperature=0.0, prefill_step=37,
                                 mtp=mtp, draft_depth=1 if mtp else None):
        got += chunk.token_ids
    assert got == want
    template = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert chunk.stats.prompt_tokens == len(template) - 1 + 3 * (CROP + 2) + GLOBAL + 2  # 3 crops of 120 px + global


def test_session_reuses_prefix_with_the_same_image_and_not_a_changed_one(vlm):
    model, tok = vlm
    a, b = sample_image(200, 200, seed=4), sample_image(200, 200, seed=5)
    chat = ChatSession(model, tok, max_tokens=3, temperature=0.0)
    chat.ask("Describe it.", images=[a])
    assert chat.image_features.encoded == 1
    first_prompt = chat.last_stats.prompt_tokens
    chat.ask("And the colours?")
    assert chat.last_reuse in ("cache", "snapshot")
    assert chat.last_stats.prefill_tokens < chat.last_stats.prompt_tokens - GLOBAL
    assert chat.image_features.encoded == 1  # the image was not encoded again

    # the same history with the picture swapped: reuse must stop before the image tokens
    history = [dict(m) for m in chat.messages]
    history[0] = {"role": "user", "content": [{"type": "image", "image": b}, {"type": "text", "text": "Describe it."}]}
    history = history[:-1]
    for _ in chat.generate_for(history):
        pass
    start = tok.apply_chat_template(history[:1], add_generation_prompt=True).index(model.image_token_id)
    assert chat.last_stats.prefill_tokens >= chat.last_stats.prompt_tokens - (start + 1)
    assert chat.image_features.encoded == 2
    assert first_prompt == len(tok.apply_chat_template(history[:1], add_generation_prompt=True)) - 1 + GLOBAL + 2


def test_text_model_refuses_images(tmp_path):
    from step35_mlx.loader import load as load_any

    path = tmp_path / "textonly"
    ids = write_vision_tokenizer(path)
    cfg = step3p7_config(image_token_id=ids["<im_patch>"], vocab_size=2056, num_mtp=0, num_layers=2)
    write_step3p7_checkpoint(path, cfg, seed=0)
    model, tok = load_any(path, dtype=mx.float32, vision=False)
    with pytest.raises(ValueError, match="has no vision tower"):
        next(stream_generate(model, tok, _msgs(sample_image(64, 64)), max_tokens=2))


def test_feature_cache_keys_on_pixels(vlm):
    model, tok = vlm
    cache = FeatureCache(capacity=1)
    msgs = _msgs(sample_image(100, 100, seed=6))
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True))
    p1 = prepare(model, tok, msgs, ids, cache).images
    p2 = prepare(model, tok, _msgs(sample_image(100, 100, seed=6)), ids, cache).images
    p3 = prepare(model, tok, _msgs(sample_image(100, 100, seed=7)), ids, cache).images
    assert p1.keys == p2.keys and p1.keys != p3.keys and p1.ids == p3.ids
    assert np.array_equal(np.array(cache.get(model, p1.images[0])), np.array(cache.get(model, p2.images[0])))
    assert cache.encoded == 1
