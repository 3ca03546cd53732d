"""Sampling math against a NumPy oracle written independently."""

import math

import mlx.core as mx
import numpy as np
import pytest

from step35_mlx.sampling import SamplingParams, masked_logits, probs, residual, sample_token


def oracle(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    x = np.asarray(logits, np.float64)
    if temperature == 0:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1
        return out
    p = np.exp((x - x.max()) / temperature)
    p /= p.sum()
    if 0 < top_k < len(p):
        p = np.where(p >= np.sort(p)[-top_k], p, 0)
        p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = np.zeros_like(p, bool)
        mass = 0.0
        for i in order:
            keep[i] = True
            mass += p[i]
            if mass >= top_p:
                break
        thresh = p[keep].min()
        p = np.where(p >= thresh, p, 0)
        p /= p.sum()
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0)
        p /= p.sum()
    return p


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.6, top_k=12, top_p=0.9, min_p=0.05),
    dict(temperature=0.0),
]


@pytest.mark.parametrize("case", CASES)
def test_probs_match_oracle(case):
    rng = np.random.RandomState(0)
    for _ in range(20):
        logits = rng.randn(40) * 3
        got = np.array(probs(mx.array(logits, dtype=mx.float32), SamplingParams(**case)))
        want = oracle(logits, **case)
        assert np.abs(got - want).max() < 2e-5
        assert ((got > 0) == (want > 0)).all()


TIE_CASES = CASES[:-1] + [
    dict(temperature=1.0, top_k=7, top_p=0.6),
    dict(temperature=0.8, top_k=3, min_p=0.2),
    dict(temperature=1.0, top_k=30, top_p=0.99, min_p=0.01),
]


@pytest.mark.parametrize("case", TIE_CASES)
def test_probs_match_oracle_with_ties(case):
    """Logits on a coarse grid (as bf16 / quantized heads give) tie at every threshold, inside and outside top-k."""
    rng = np.random.RandomState(1)
    for _ in range(20):
        logits = np.round(rng.randn(300) * 2) / 2
        got = np.array(probs(mx.array(logits, dtype=mx.float32), SamplingParams(**case)))
        want = oracle(logits, **case)
        assert np.abs(got - want).max() < 2e-5
        assert ((got > 0) == (want > 0)).all()


def test_probs_batched_rows_are_independent():
    rng = np.random.RandomState(2)
    logits = rng.randn(4, 64) * 3
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.7)
    got = np.array(probs(mx.array(logits, dtype=mx.float32), params))
    for row, want in zip(got, (oracle(l, 0.9, top_k=10, top_p=0.7) for l in logits)):
        assert np.abs(row - want).max() < 2e-5


def test_greedy_token_is_the_argmax():
    logits = mx.array(np.random.RandomState(3).randn(3, 1000).astype(np.float32))
    assert sample_token(logits, SamplingParams(temperature=0.0)).tolist() == np.argmax(np.array(logits), -1).tolist()
    with pytest.raises(ValueError):
        masked_logits(logits, SamplingParams(temperature=0.0))


@pytest.mark.parametrize("case", [dict(temperature=1.0, top_k=4), dict(temperature=0.7, top_p=0.8),
                                  dict(temperature=1.2, top_k=6, top_p=0.9, min_p=0.1)])
def test_sample_token_draws_from_probs(case):
    """20,000 draws in one batch: the frequencies match ``probs`` (and the oracle) within 5 sigma, nothing outside."""
    logits = np.round(np.random.RandomState(4).randn(12) * 4) / 4
    params = SamplingParams(**case)
    n = 20_000
    toks = np.array(sample_token(mx.array(np.tile(logits, (n, 1)), dtype=mx.float32), params, mx.random.key(5)))
    freq = np.bincount(toks, minlength=len(logits)) / n
    want = oracle(logits, **case)
    assert (freq[want == 0] == 0).all()
    sigma = np.sqrt(want * (1 - want) / n)
    assert (np.abs(freq - want) <= 5 * sigma + 1e-12).all(), (freq, want)


def test_top_p_keeps_ties_and_the_crossing_token():
    logits = mx.array([math.log(0.4), math.log(0.3), math.log(0.3)])
    p = np.array(probs(logits, SamplingParams(temperature=1.0, top_p=0.5)))
    # 0.4 < 0.5, so the next token crosses the threshold; its tie comes along
    assert (p > 0).all()
    p = np.array(probs(logits, SamplingParams(temperature=1.0, top_p=0.35)))
    assert (p > 0).tolist() == [True, False, False]


def test_residual():
    p = mx.array([0.5, 0.3, 0.2])
    q = mx.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(np.array(residual(p, q)), [1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(np.array(residual(p, p)), np.array(p))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.0)])
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
