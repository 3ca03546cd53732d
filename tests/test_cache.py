"""Caches: cached decode, chunked prefill and speculative rollback equal the full forward."""

import mlx.core as mx
import numpy as np
import pytest

from step35_mlx import load_model
from step35_mlx.cache import KVCache, SlidingKVCache
from step35_mlx.synthetic import tiny_config

from conftest import rel_err, tokens_for

WINDOW = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from step35_mlx.synthetic import write_hf_checkpoint

    cfg = tiny_config(sliding_window=WINDOW, num_layers=5, full_layers={1, 4}, moe_layers={2, 3, 4})
    path = tmp_path_factory.mktemp("cache") / "ckpt"
    write_hf_checkpoint(path, cfg, seed=3)
    return load_model(path, dtype=mx.float32)


def _kv(T, start, H=2, D=4):
    """Keys/values whose entries encode their absolute position."""
    pos = mx.arange(start, start + T, dtype=mx.float32)
    k = mx.broadcast_to(pos[None, None, :, None], (1, H, T, D))
    return k, k + 0.5


def test_sliding_ring_positions_and_mask_follow_the_window():
    c = SlidingKVCache(window=4, slack=2)
    fed = 0
    for T in [3, 1, 1, 2, 5, 1, 3, 1, 9, 1]:
        mask = c.make_mask(T)
        k, v = _kv(T, fed)
        keys, _ = c.update_and_fetch(k, v)
        fed += T
        stored = np.array(keys[0, 0, :, 0])
        q = np.arange(fed - T, fed)
        want = (stored[None, :] <= q[:, None]) & (stored[None, :] > q[:, None] - 4)
        if mask is None:
            got = np.ones((T, len(stored)), bool)
        elif isinstance(mask, str):
            got = np.tril(np.ones((T, len(stored)), bool), k=len(stored) - T)
        else:
            got = np.array(mask)
        assert (got == want).all(), (T, fed, stored, got, want)
        # every query sees exactly the last min(window, pos+1) positions
        assert (got.sum(1) == np.minimum(4, q + 1)).all()
    assert c.offset == fed and c.keys.shape[2] == 6


def test_trim_after_wrap_restores_exact_state():
    c = SlidingKVCache(window=4, slack=3)
    c.update_and_fetch(*_kv(10, 0))  # wrapped: capacity 7
    assert c.max_trim() >= 3
    c.update_and_fetch(*_kv(3, 10))  # a draft of 3
    c.trim(3)
    keys, _ = c.update_and_fetch(*_kv(1, 10))
    mask = np.array(c.make_mask(1)) if False else None
    stored = np.array(keys[0, 0, :, 0])
    # positions 7, 8, 9, 10 must all be present and intact
    for p in (7, 8, 9, 10):
        assert p in stored


def test_trim_refuses_what_the_ring_cannot_undo():
    c = SlidingKVCache(window=4, slack=2)
    c.update_and_fetch(*_kv(12, 0))
    limit = c.max_trim()
    assert limit == 2 + 1  # capacity 6 holds positions 6..11; next query at 12-n needs 12-n-3 >= 6
    with pytest.raises(ValueError, match="rolled back exactly"):
        c.trim(limit + 1)
    c.trim(limit)
    full = KVCache()
    full.update_and_fetch(*_kv(12, 0))
    assert full.trim(12) == 12 and full.offset == 0
    with pytest.raises(ValueError):
        full.trim(1)


def test_cached_decode_equals_full_forward_past_the_window(model):
    T = 5 * WINDOW + 3
    toks = tokens_for(model.config.vocab_size, T, seed=1)
    full = model(toks)
    cache = model.make_cache()
    steps = [model(toks[:, :1], cache=cache)] + [model(toks[:, t : t + 1], cache=cache) for t in range(1, T)]
    assert rel_err(mx.concatenate(steps, axis=1), full) <= 1e-5


@pytest.mark.parametrize("chunk", [2, 3, 7, WINDOW, WINDOW + 1, 13, 64])
def test_chunked_prefill_equals_one_pass(model, chunk):
    T = 6 * WINDOW + 5
    toks = tokens_for(model.config.vocab_size, T, seed=2)
    full = model(toks)
    cache = model.make_cache(slack=2)
    out = mx.concatenate([model(toks[:, s : s + chunk], cache=cache) for s in range(0, T, chunk)], axis=1)
    assert rel_err(out, full) <= 1e-5


def test_speculative_write_and_rollback_equals_full_forward(model):
    """Random drafts of up to slack+1 tokens, partially accepted, across many wraps."""
    slack = 4
    T = 12 * WINDOW
    toks = tokens_for(model.config.vocab_size, T, seed=4)
    full = np.array(model(toks))
    rng = np.random.RandomState(0)
    cache = model.make_cache(slack=slack)
    model(toks[:, :5], cache=cache)
    got = {}
    pos = 5
    trims = 0
    while pos < T:
        n = min(int(rng.randint(1, slack + 2)), T - pos)
        out = np.array(model(toks[:, pos : pos + n], cache=cache))
        keep = int(rng.randint(1, n + 1))
        for c in cache:
            c.trim(n - keep)
        trims += n - keep
        for i in range(keep):
            got[pos + i] = out[0, i]
        pos += keep
    rows = sorted(got)
    assert trims > 20
    assert rel_err(np.stack([got[r] for r in rows]), full[0, rows]) <= 1e-5


def test_batched_cache_matches_per_row(model):
    T = 3 * WINDOW
    toks = tokens_for(model.config.vocab_size, T, seed=5, batch=2)
    cache = model.make_cache()
    model(toks[:, : T - 4], cache=cache)
    out = model(toks[:, T - 4 :], cache=cache)
    for b in range(2):
        ref = model(toks[b : b + 1])[:, T - 4 :]
        assert rel_err(out[b : b + 1], ref) <= 1e-5


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """head_dim 64 so the KV cache can be quantized with group size 64."""
    from step35_mlx.synthetic import write_hf_checkpoint

    cfg = tiny_config(num_layers=4, full_layers={0, 3}, sliding_window=WINDOW, head_dim=64, hidden_size=128)
    path = tmp_path_factory.mktemp("kvq") / "ckpt"
    write_hf_checkpoint(path, cfg, seed=1)
    return load_model(path, dtype=mx.float32)


@pytest.mark.parametrize("bits, tol", [(8, 2e-2), (4, 0.6)])
def test_quantized_kv_cache_tracks_float_and_chunks_exactly(model64, bits, tol):
    m = model64
    T = 6 * WINDOW + 3
    toks = tokens_for(m.config.vocab_size, T, seed=8)
    full = m(toks)
    outs = []
    for chunk in (1, 5, T):
        cache = m.make_cache(kv_bits=bits)
        outs.append(mx.concatenate([m(toks[:, s : s + chunk], cache=cache) for s in range(0, T, chunk)], axis=1))
        assert isinstance(cache[0].keys, tuple) and isinstance(cache[1].keys, tuple)
    # The quantized cache is a lossy but close approximation. Chunking only reorders float
    # rounding, which can flip a quantization code downstream: bounded by a small fraction
    # of the quantization error itself, not by 1e-5.
    q_err = rel_err(outs[0], full)
    assert 0 < q_err <= tol
    assert rel_err(outs[1], outs[0]) <= 0.05 * q_err and rel_err(outs[2], outs[0]) <= 0.05 * q_err


def test_quantized_kv_cache_rolls_back_exactly(model64):
    """Speculative-style writes and trims with a 8-bit cache equal plain 8-bit cached decoding."""
    m = model64
    T = 8 * WINDOW
    toks = tokens_for(m.config.vocab_size, T, seed=9)
    ref_cache = m.make_cache(kv_bits=8)
    ref = np.array(mx.concatenate([m(toks[:, t : t + 1], cache=ref_cache) for t in range(T)], axis=1))
    rng = np.random.RandomState(1)
    cache = m.make_cache(kv_bits=8, slack=3)
    got, pos = {}, 0
    while pos < T:
        n = min(int(rng.randint(1, 5)), T - pos)
        out = np.array(m(toks[:, pos : pos + n], cache=cache))
        keep = int(rng.randint(1, n + 1))
        for c in cache:
            c.trim(n - keep)
        for i in range(keep):
            got[pos + i] = out[0, i]
        pos += keep
    assert rel_err(np.stack([got[r] for r in range(T)]), ref[0]) <= 1e-5


def test_quantized_kv_memory_and_bad_settings(model64):
    m = model64
    toks = tokens_for(m.config.vocab_size, 40, seed=2)
    sizes = {}
    for bits in (None, 8, 4):
        cache = m.make_cache(kv_bits=bits)
        m(toks, cache=cache)
        sizes[bits] = sum(c.nbytes for c in cache)
    # float32 activations: 8-bit stores (8 + 2*32/64) / 32 of the bytes, 4-bit (4 + 1) / 32
    assert sizes[8] / sizes[None] == pytest.approx(9 / 32)
    assert sizes[4] / sizes[None] == pytest.approx(5 / 32)
    with pytest.raises(ValueError, match="kv bits"):
        m.make_cache(kv_bits=3)
