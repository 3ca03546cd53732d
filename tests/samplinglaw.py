"""Does MTP sampling emit sequences with the target model's law? Exact law by enumeration, chi-square test."""

import itertools
import math

import mlx.core as mx
import numpy as np

from step35_mlx.sampling import SamplingParams, probs
from step35_mlx.speculative import SpecStats, speculative_tokens


def exact_law(model, prompt: mx.array, params: SamplingParams, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Every token sequence of ``length`` after ``prompt`` (rows of ``seqs``) and its probability under plain sampling."""
    V = model.config.vocab_size
    seqs = np.array(list(itertools.product(range(V), repeat=length)))
    ctx = mx.concatenate([mx.broadcast_to(prompt[None], (len(seqs), prompt.size)), mx.array(seqs[:, :length - 1])],
                         axis=1)
    P = np.array(probs(model(ctx)[:, -length:], params))
    rows = np.arange(len(seqs))
    return seqs, np.prod([P[rows, i, seqs[:, i]] for i in range(length)], axis=0)


def mtp_counts(model, prompt: mx.array, params: SamplingParams, length: int, n: int, depth: int,
               **kwargs) -> tuple[np.ndarray, SpecStats]:
    """How often each sequence (indexed as in :func:`exact_law`) came out of ``n`` seeded MTP runs."""
    V = model.config.vocab_size
    counts = np.zeros(V ** length)
    stats = SpecStats(depth)
    for seed in range(n):
        out = []
        gen = speculative_tokens(model, model.make_cache(), prompt, params, depth=depth, key=mx.random.key(seed),
                                 stats=stats, **kwargs)
        for t in gen:
            out.append(t)
            if len(out) == length:
                break
        gen.close()
        counts[sum(t * V ** (length - 1 - i) for i, t in enumerate(out))] += 1
    return counts, stats


def chi2_upper(dof: float, z: float = 3.09) -> float:
    """Wilson-Hilferty chi-square quantile (z = 3.09: 99.9 %)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_same_law(counts: np.ndarray, exact: np.ndarray) -> None:
    """Chi-square test of ``counts`` against ``exact`` (cells expecting < 5 pooled); impossible sequences never appear."""
    expected = exact * counts.sum()
    big = expected >= 5
    chi2 = ((counts[big] - expected[big]) ** 2 / expected[big]).sum()
    chi2 += (counts[~big].sum() - expected[~big].sum()) ** 2 / max(expected[~big].sum(), 1e-9)
    assert counts[exact == 0].sum() == 0
    assert chi2 < chi2_upper(int(big.sum())), chi2
