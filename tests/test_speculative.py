"""MTP modules and speculative decoding: reference parity, exactness, rollback, real drafting."""


import mlx.core as mx
import numpy as np
import pytest

from step35_mlx import load_model
from step35_mlx.sampling import SamplingParams
from step35_mlx.speculative import MTPDrafter, SpecStats, accept_drafts, speculative_tokens
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint
from reference import reference_logits, reference_mtp_logits
from samplinglaw import assert_same_law, exact_law, mtp_counts

from conftest import rel_err


def _load(tmp_path_factory, name, cfg, seed=1):
    path = tmp_path_factory.mktemp(name) / "ckpt"
    weights = write_hf_checkpoint(path, cfg, seed=seed)
    return load_model(path, dtype=mx.float32), weights


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """4-token vocabulary, seed picked (by a scan) so random MTP heads agree with the trunk part of the time.

    The greedy test asserts partial acceptance, so a seed that stopped giving it fails loudly.
    """
    cfg = tiny_config(num_layers=3, full_layers={0}, moe_layers={1, 2}, sliding_window=5, vocab_size=4,
                      hidden_size=32, head_dim=8)
    return _load(tmp_path_factory, "v4", cfg, seed=6)[0]


@pytest.mark.parametrize("variant", ["pre_norm", "post_norm"])
def test_mtp_logits_match_float64_reference(tmp_path_factory, variant):
    # MTP layer 5 (module 1) is full attention; module 2 has a binding shared clamp.
    cfg = tiny_config(num_layers=4, full_layers={0, 3, 5}, sliding_window=5,
                      swiglu_limits_shared=[0, 0, 0, 1.5, 0, 0, 0.3])
    model, weights = _load(tmp_path_factory, "mtp", cfg)
    assert model.model.mtp[1].self_attn.num_heads == cfg["num_attention_heads"]  # its own layer's settings
    assert model.model.mtp[2].mlp.limit == 0.3
    toks = np.random.RandomState(0).randint(0, cfg["vocab_size"], 30)
    model.mtp_hidden = variant
    x = mx.array(toks)[None]
    ours = model.mtp_logits(x, model.forward_hidden(x))
    ref = reference_mtp_logits(cfg, weights, toks, variant=variant)
    _, margin = reference_logits(cfg, weights, toks)
    assert len(ours) == 3
    for k, (a, b) in enumerate(zip(ours, ref)):
        keep = margin[: b.shape[0]] > 1e-5
        assert a.shape[1] == b.shape[0] == 30 - k - 1
        assert rel_err(np.array(a[0])[keep], b[keep]) <= 1e-4, (variant, k)


def _ar_greedy(model, prompt, n):
    cache = model.make_cache()
    logits = model(prompt[None], cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return out


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_mtp_equals_greedy_ar(small_vocab, depth):
    model = small_vocab
    prompt = mx.array([1, 2, 3, 0, 1, 2, 3, 0, 1])
    n = 1000  # window 5: the sliding rings wrap ~200 times
    ref = _ar_greedy(model, prompt, n)
    stats = SpecStats(depth)
    cache = model.make_cache()
    out = []
    for t in speculative_tokens(model, cache, prompt, SamplingParams(temperature=0), depth=depth, stats=stats):
        out.append(t)
        if len(out) == n:
            break
    assert out == ref
    # partial and full acceptance both happened, so rollback after wrap-around was exercised
    assert 0.1 < stats.acceptance[0] < 0.9
    assert stats.tokens_per_verify > 1.2
    if depth > 1:
        assert 0.1 < stats.acceptance[1] < 0.9
    assert cache[0].offset == len(prompt) + n  # on close the cache holds exactly the yielded tokens


def test_accept_drafts_is_exact_oracle():
    """First emitted token is distributed as p whatever q is (draft ~ q, accept or resample)."""
    p = mx.array([[0.5, 0.2, 0.2, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = mx.array([[0.1, 0.1, 0.3, 0.3, 0.2]])
    rng = np.random.RandomState(0)
    n = 4000
    counts = np.zeros(5)
    accepted = 0
    for i in range(n):
        d = int(rng.choice(5, p=np.array(q[0])))
        a, nxt = accept_drafts(p, q, [d], mx.random.key(i))
        first = d if a == 1 else nxt
        counts[first] += 1
        accepted += a
    assert counts[4] == 0  # p(4) = 0 is never emitted even though q proposes it
    freq = counts / n
    assert np.abs(freq - np.array(p[0])).max() < 0.025
    # acceptance rate = sum(min(p, q)) = 0.1 + 0.1 + 0.2 + 0.1 + 0 = 0.5
    assert abs(accepted / n - 0.5) < 0.03


def test_sampled_mtp_distribution_equals_target(tmp_path_factory):
    V = 5
    cfg = tiny_config(num_layers=2, full_layers={0}, moe_layers={1}, sliding_window=4, vocab_size=V,
                      hidden_size=32, head_dim=8, num_mtp=2)
    model, _ = _load(tmp_path_factory, "v5", cfg)
    prompt = mx.array([1, 2, 3, 4, 0, 1])
    params = SamplingParams(temperature=1.0, top_k=4)
    _, exact = exact_law(model, prompt, params, 3)
    counts, stats = mtp_counts(model, prompt, params, 3, 700, depth=2)
    assert 0.2 < stats.acceptance[0] < 0.95  # both branches of the acceptance rule ran
    assert_same_law(counts, exact)  # top-k excluded tokens never appear


def test_checkpoint_without_mtp_refuses_instead_of_falling_back(tmp_path_factory):
    cfg = tiny_config(num_layers=2, full_layers={0}, moe_layers={1}, num_mtp=0)
    model, _ = _load(tmp_path_factory, "nomtp", cfg)
    with pytest.raises(ValueError, match="draft depth"):
        MTPDrafter(model, 1)


def test_mtp_caches_track_committed_rows(small_vocab):
    model = small_vocab
    prompt = mx.array([3, 1, 2, 1, 0, 2, 3])
    drafter = MTPDrafter(model, 3)
    cache = model.make_cache()
    gen = speculative_tokens(model, cache, prompt, SamplingParams(temperature=0), depth=3, drafter=drafter)
    out = [next(gen) for _ in range(40)]
    gen.close()
    history = prompt.tolist() + out
    # module k holds exactly the committed rows r with r + k + 1 <= len(history) - 1 ... minus the pending token
    assert drafter.rows == len(history) == cache[0].offset
    for k in range(3):
        assert drafter.done[k] <= drafter.rows
        assert drafter.caches[k].offset == drafter.done[k]
    # a follow-up call continues from the same drafter and cache, exactly like one long greedy run
    more = mx.array([2, 1])
    gen = speculative_tokens(model, cache, more, SamplingParams(temperature=0), depth=3, drafter=drafter,
                             history=history + more.tolist())
    cont = [next(gen) for _ in range(30)]
    gen.close()
    ref = _ar_greedy(model, mx.array(history + more.tolist()), 30)
    assert cont == ref


def test_slice_rows_is_exact_for_quantized_and_float_heads():
    import mlx.nn as nn

    from step35_mlx.draft_vocab import slice_rows

    x = mx.random.normal((3, 64), key=mx.random.key(0))
    ids = mx.array([0, 5, 17, 30], dtype=mx.int32)
    for lin in (nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4), nn.Linear(64, 32, bias=False)):
        assert mx.array_equal(slice_rows(lin, ids)(x), lin(x)[:, ids])


@pytest.mark.parametrize("depth", [1, 3])
def test_greedy_reduced_vocab_drafts_equal_greedy_ar(small_vocab, depth):
    """Drafting over 2 of the 4 tokens: output stays greedy decoding's; tokens outside are never drafted."""
    model = small_vocab
    prompt = mx.array([1, 2, 3, 0, 1, 2, 3, 0, 1])
    n = 300
    ref = _ar_greedy(model, prompt, n)
    stats = SpecStats(depth)
    out = []
    for t in speculative_tokens(model, model.make_cache(), prompt, SamplingParams(temperature=0), depth=depth,
                                stats=stats, draft_vocab=mx.array([0, 2], dtype=mx.int32)):
        out.append(t)
        if len(out) == n:
            break
    assert out == ref
    assert set(ref) - {0, 2}, "the reference must use tokens outside the draft vocabulary"
    assert 0.05 < stats.acceptance[0] < 0.95


def test_sampled_reduced_vocab_mtp_distribution_equals_target(tmp_path_factory):
    """Draft probs over 3 of 5 tokens (zero elsewhere): the first two emitted tokens are still distributed as p."""
    V = 5
    cfg = tiny_config(num_layers=2, full_layers={0}, moe_layers={1}, sliding_window=4, vocab_size=V,
                      hidden_size=32, head_dim=8, num_mtp=1)
    model, _ = _load(tmp_path_factory, "v5r", cfg)
    prompt = mx.array([1, 2, 3, 4, 0, 1])
    params = SamplingParams(temperature=1.0)
    _, exact = exact_law(model, prompt, params, 2)
    counts, stats = mtp_counts(model, prompt, params, 2, 400, depth=1, draft_vocab=mx.array([0, 1, 3], dtype=mx.int32))
    assert 0.1 < stats.acceptance[0] < 0.95
    assert_same_law(counts, exact)


def test_draft_vocab_file_round_trip_and_default(tmp_path, small_vocab):
    from step35_mlx.draft_vocab import default_draft_ids, load_draft_vocab, rank_tokens, save_draft_vocab

    ranked = rank_tokens([[3, 3, 1, 3, 1], [2]], 4, always=[0])
    assert ranked == [0, 3, 1, 2]  # forced id first, then by count, ties by id
    with pytest.raises(ValueError):
        save_draft_vocab(tmp_path, ranked, "test", 5)
    save_draft_vocab(tmp_path, ranked, "test", 2)
    vocab = load_draft_vocab(tmp_path)
    assert vocab.ids == (0, 3, 1, 2) and vocab.size == 2 and vocab.source == "test"
    assert vocab.top(3).tolist() == [0, 1, 3]
    small_vocab.source_path = tmp_path
    try:
        assert default_draft_ids(small_vocab).tolist() == [0, 3]
    finally:
        del small_vocab.source_path
    assert default_draft_ids(small_vocab) is None and load_draft_vocab(tmp_path / "none") is None
