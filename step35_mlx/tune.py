"""Measure plain vs MTP decoding on this machine and remember the fastest per model.

The best draft depth depends on the chip (bandwidth vs compute) and on how well the
checkpoint's MTP heads agree with the trunk, so it is measured, not assumed. The
choice is stored by :mod:`step35_mlx.tuned`, and ``generate``/``chat`` use it when
``--mtp`` is not given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from .costs import RoutingRecorder, decode_cost, mtp_draft_bytes
from .decode import ar_tokens
from .draft_config import stored_gate
from .draft_vocab import default_draft_ids
from .model import Model
from .sampling import SamplingParams
from .speculative import MTPDrafter, SpecStats, speculative_tokens
from .streams import use_two_streams
from .tuned import TuneResult

TUNE_PROMPT = (
    "<|im_start|>user\nExplain what the `with` statement does in Python, with an example.<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n"
)


def measure_one(model: Model, prompt: Sequence[int], depth: int, n_tokens: int,
                params: SamplingParams = SamplingParams(temperature=0.0), seed: int = 0,
                draft_vocab: mx.array | None = None, min_confidence: float = 0.0,
                stats: SpecStats | None = None) -> tuple[list[int], TuneResult]:
    """Decode ``n_tokens`` after ``prompt``; returns the tokens and timing, acceptance and bytes read.

    ``draft_vocab``: ids the MTP drafts are restricted to (``None``: the whole vocabulary);
    ``min_confidence``: the draft gate (:mod:`step35_mlx.draft_gate`). ``stats``: filled with the
    run's acceptance statistics when given.
    """
    cache = model.make_cache()
    if depth and stats is None:
        stats = SpecStats(depth)
    drafter = MTPDrafter(model, depth, vocab=draft_vocab, min_confidence=min_confidence) if depth else None
    key = mx.random.key(seed)
    prompt_arr = mx.array(list(prompt), dtype=mx.int32)
    gen = (speculative_tokens(model, cache, prompt_arr, params, depth=depth, key=key, stats=stats,
                              drafter=drafter)
           if depth else ar_tokens(model, cache, prompt_arr, params, key=key))
    out: list[int] = []
    with RoutingRecorder(model) as rec:
        out.append(next(gen))  # prefill and first token: not part of the decode measurement
        rec.clear()
        calls_before = list(drafter.calls) if drafter else []
        t0 = time.perf_counter()
        for tok in gen:
            out.append(tok)
            if len(out) > n_tokens:
                break
        dt = time.perf_counter() - t0
        forwards = rec.forwards()
        gen.close()
        generated = len(out) - 1
        calls = [c - b for c, b in zip(drafter.calls, calls_before)] if drafter else []
        rows = model.config.vocab_size if draft_vocab is None else int(draft_vocab.shape[0])
        cost = decode_cost(model, rec, generated, forwards, calls,
                           [mtp_draft_bytes(model, k, rows) for k in range(depth)])
    return out, TuneResult(
        depth=depth,
        tokens_per_s=generated / dt,
        bytes_per_token=cost.per_token,
        tokens_per_verify=stats.tokens_per_verify if stats else 1.0,
        acceptance=stats.acceptance if stats else [],
    )


def measure(model: Model, prompt: Sequence[int], n_tokens: int = 128, depths: Sequence[int] | None = None,
            repeats: int = 1, params: SamplingParams = SamplingParams(temperature=0.0)) -> list[TuneResult]:
    """Interleaved runs of every mode (median tokens/s); greedy outputs are checked to agree.

    MTP runs draft as generation would: with the folder's ``draft_vocab.json`` and ``draft.json`` gate.
    """
    if depths is None:
        depths = [0] + list(range(1, min(3, model.num_mtp) + 1))
    vocab = default_draft_ids(model)
    gate = stored_gate(model)
    runs: dict[int, list[TuneResult]] = {d: [] for d in depths}
    reference = None
    for r in range(repeats):
        for d in depths:
            out, res = measure_one(model, prompt, d, n_tokens, params, seed=r, draft_vocab=vocab, min_confidence=gate)
            reference = reference or out
            if params.greedy and out != reference:
                raise RuntimeError(f"MTP depth {d} produced different greedy tokens than plain decoding")
            runs[d].append(res)
    results = []
    for d in depths:
        ordered = sorted(runs[d], key=lambda x: x.tokens_per_s)
        results.append(ordered[len(ordered) // 2])
    return results


@dataclass
class StreamsResult:
    """Plain greedy decode speed on one and on two CPU streams (medians of interleaved repeats)."""

    one: float  # tokens/s
    two: float

    @property
    def winner(self) -> int:
        return 2 if self.two > self.one else 1


def measure_streams(model: Model, prompt: Sequence[int], n_tokens: int = 128, repeats: int = 1) -> StreamsResult:
    """Plain decoding on one stream vs two (``streams.use_two_streams``), interleaved; the greedy
    tokens must agree. Leaves the model on one stream; the caller switches on the winner."""
    speeds: dict[int, list[float]] = {1: [], 2: []}
    reference = None
    try:
        for r in range(repeats):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                use_two_streams(model, n == 2)
                out, res = measure_one(model, prompt, 0, n_tokens, seed=r)
                reference = reference or out
                if out != reference:
                    raise RuntimeError("two CPU streams produced different greedy tokens than one")
                speeds[n].append(res.tokens_per_s)
    finally:
        use_two_streams(model, False)
    med = {n: sorted(v)[len(v) // 2] for n, v in speeds.items()}
    return StreamsResult(med[1], med[2])


def best(results: Sequence[TuneResult]) -> TuneResult:
    return max(results, key=lambda r: r.tokens_per_s)


def teacher_forced_agreement(model: Model, tokens: Sequence[int], chunk: int = 1024) -> dict[str, list[float]]:
    """Per MTP module k, how often its argmax at row t equals the trunk's argmax at row t + k + 1.

    That is the acceptance greedy speculative decoding would see if all earlier drafts
    passed. Also reports agreement with the text itself (token t + k + 2). Used to choose
    ``model.mtp_hidden`` (pre- vs post-final-norm trunk hidden into module 0) by measurement.
    """
    x = mx.array([list(tokens)[:chunk]])
    hidden = model.forward_hidden(x)
    trunk = mx.argmax(model.logits(hidden), axis=-1)[0]
    vs_trunk, vs_text = [], []
    for k, logits in enumerate(model.mtp_logits(x, hidden)):
        pred = mx.argmax(logits, axis=-1)[0]
        n = pred.shape[0]
        if n == 0:
            vs_trunk.append(0.0)
            vs_text.append(0.0)
            continue
        vs_trunk.append(float((pred == trunk[k + 1 : k + 1 + n]).mean().item()))
        # the last row predicts the token after the text, so it has no text target
        vs_text.append(float((pred[: n - 1] == x[0, k + 2 :]).mean().item()) if n > 1 else 0.0)
    return {"vs_trunk": vs_trunk, "vs_text": vs_text}
