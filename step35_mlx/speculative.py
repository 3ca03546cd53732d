"""MTP self-speculative decoding: draft with the checkpoint's MTP modules, verify with the trunk.

One step: chain MTP modules 0..d-1 to draft d tokens, run the trunk once on
``[pending token, draft_1..draft_d]``, accept drafts with the Leviathan-Chen rule
(``min(1, p/q)``, resample from ``max(p - q, 0)`` on rejection, a bonus token from the
trunk when all pass), roll every cache back to the committed tokens. At temperature 0
the output is token for token greedy decoding; at temperature > 0 it is distributed
exactly as plain sampling from ``sampling.probs``.

MTP bookkeeping (row r = trunk position r): module k at row r embeds token r + k + 1 and
reads row r of the previous stage (trunk hidden for k = 0). A row is *committed* once
its token is; rows that used draft tokens are computed for drafting and then trimmed
from that module's cache, to be recomputed when their tokens are committed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .distributed.sync import root_tokens
from .model import DEFAULT_SLACK, Model
from .draft_config import stored_gate
from .draft_gate import confident, draft_confidence
from .draft_vocab import default_draft_ids, slice_rows
from .sampling import SamplingParams, probs, residual, sample, sample_token

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class SpecStats:
    """Acceptance per draft position and tokens per verify, for reporting and tuning.

    ``lengths[i]``: verifies that checked ``i`` drafts (fewer than ``depth`` when gated).
    """

    depth: int
    verifies: int = 0
    emitted: int = 0
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proposed = [0] * self.depth
        self.accepted = [0] * self.depth
        self.lengths = [0] * (self.depth + 1)

    def record(self, n_accepted: int, n_drafts: int) -> None:
        self.verifies += 1
        self.emitted += n_accepted + 1
        self.lengths[n_drafts] += 1
        for i in range(min(n_accepted + 1, n_drafts)):
            self.proposed[i] += 1
            self.accepted[i] += int(i < n_accepted)

    @property
    def acceptance(self) -> list[float]:
        """P(draft i accepted | drafts before it accepted), per position."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_verify(self) -> float:
        return self.emitted / self.verifies if self.verifies else 0.0


def _accept(p: mx.array, q: mx.array | None, drafts: mx.array, key: mx.array) -> mx.array:
    """Leviathan-Chen acceptance on the device: ``[n accepted, next token]`` (lazy).

    ``p``: target probs ``[d + 1, V]``; ``q``: draft probs ``[d, V]``. The next token is a
    resample from ``max(p - q, 0)`` at the first rejection, or a bonus draw from ``p[d]``
    when all drafts pass (the residual against a zero ``q`` row is ``p`` itself).
    """
    d = drafts.shape[0]
    V = p.shape[-1]
    k_u, k_s = mx.random.split(key)
    if d:
        rows = mx.arange(d)
        ratio = p[rows, drafts] / q[rows, drafts]
        rejected = mx.random.uniform(shape=(d,), key=k_u) >= mx.minimum(ratio, 1.0)
        n = mx.argmax(mx.concatenate([rejected, mx.array([True])]).astype(mx.int32))
        q_n = mx.take(mx.concatenate([q, mx.zeros((1, V), q.dtype)]), n, axis=0)
    else:
        n, q_n = mx.array(0, mx.uint32), mx.zeros((V,), p.dtype)
    nxt = sample(residual(mx.take(p, n, axis=0), q_n), key=k_s)
    return mx.stack([n.astype(mx.int32), nxt.astype(mx.int32)])


def _accept_greedy(logits: mx.array, drafts: mx.array) -> mx.array:
    """Greedy acceptance: drafts pass while they equal the trunk's argmax; ``[n, argmax of row n]`` (lazy)."""
    targets = mx.argmax(logits, axis=-1).astype(mx.int32)
    d = drafts.shape[0]
    n = mx.cumprod((targets[:d] == drafts).astype(mx.int32)).sum() if d else mx.array(0, mx.int32)
    return mx.stack([n.astype(mx.int32), mx.take(targets, n)])


def accept_drafts(p: mx.array, q: mx.array, drafts: Sequence[int], key: mx.array) -> tuple[int, int]:
    """Leviathan-Chen acceptance. ``p``: target probs ``[d + 1, V]``; ``q``: draft probs ``[d, V]``.

    Returns (number of drafts accepted, the next token: a resample from the residual
    at the first rejection, or a bonus draw from ``p[d]`` when all drafts pass).
    """
    n, nxt = _accept(p, q, mx.array(list(drafts), dtype=mx.int32), key).tolist()
    return n, nxt


@dataclass
class Drafts:
    """One proposal: ``tokens`` ``[d]`` (int32, on the device) and their draft probs ``[d, V]`` (``None`` when greedy)."""

    tokens: mx.array
    q: mx.array | None


class MTPDrafter:
    """Keeps MTP modules 0..depth-1 in step with committed tokens and proposes drafts.

    ``done[k]``: rows committed in module k's cache. ``inputs[k]``: previous-stage rows
    from ``done[k]`` that module k has not consumed yet (trunk hidden rows for k = 0).
    ``vocab``: token ids the drafts are restricted to (``draft_vocab``); ``None`` drafts
    over the whole vocabulary. ``min_confidence`` > 0 gates the draft length
    (:mod:`step35_mlx.draft_gate`). Output is exact either way: the trunk verifies.
    ``calls[k]``: forwards of module k so far (for byte accounting).
    """

    def __init__(self, model: Model, depth: int, start: int = 0, slack: int = DEFAULT_SLACK,
                 vocab: mx.array | None = None, min_confidence: float = 0.0):
        if not 1 <= depth <= model.num_mtp:
            raise ValueError(f"draft depth must be in [1, {model.num_mtp}] for this checkpoint, got {depth}")
        if depth > slack:
            raise ValueError(f"draft depth {depth} exceeds the cache slack {slack}")
        self.model = model
        self.depth = depth
        self.slack = slack
        self.vocab = vocab
        self.min_confidence = min_confidence
        self.calls = [0] * depth
        self.heads = ([slice_rows(model.model.mtp[k].shared_head.output, vocab) for k in range(depth)]
                      if vocab is not None else None)
        self.reset(start)

    def reset(self, start: int) -> None:
        """Empty MTP caches whose first row is trunk position ``start``.

        Starting mid-sequence (e.g. after a chat history was rewritten) only lowers the
        first drafts' acceptance: verification keeps the output exact whatever is drafted.
        """
        self.caches = self.model.make_mtp_cache(self.slack)[: self.depth]
        self.done = [start] * self.depth
        self.inputs: list[mx.array | None] = [None] * self.depth

    def head_bytes(self, k: int) -> int:
        """Bytes the draft head of module ``k`` reads per drafted token (norm + output rows)."""
        full = self.model.model.mtp[k].shared_head
        out = self.heads[k] if self.heads is not None else full.output
        return sum(v.nbytes for _, v in tree_flatten(full.norm.parameters())) + \
            sum(v.nbytes for _, v in tree_flatten(out.parameters()))

    @property
    def rows(self) -> int:
        """Trunk rows handed to the drafter so far (its next row is this position)."""
        return self.done[0] + (self.inputs[0].shape[1] if self.inputs[0] is not None else 0)

    def drop_rows(self, n: int) -> None:
        """Forget the last ``n`` trunk rows not yet consumed (tokens the caller never committed)."""
        if n:
            if self.inputs[0] is None or self.inputs[0].shape[1] < n:
                raise ValueError(f"cannot drop {n} rows the drafter has already consumed")
            self.inputs[0] = self.inputs[0][:, : self.inputs[0].shape[1] - n]

    def add_hidden(self, hidden: mx.array) -> None:
        """Append committed trunk rows (pre-final-norm hidden, continuing the previous ones)."""
        h = self.model.mtp_input(hidden)
        self.inputs[0] = h if self.inputs[0] is None else mx.concatenate([self.inputs[0], h], axis=1)

    def _draft_logits(self, k: int, z: mx.array) -> mx.array:
        """Full-vocabulary logits ``[V]`` of module ``k`` for its last row, or ``[N]`` over ``vocab``."""
        if self.heads is None:
            return self.model.mtp_head(k, z)[0, -1]
        return self.heads[k](self.model.model.mtp[k].shared_head.norm(z))[0, -1]

    def _draft(self, k: int, z: mx.array, ctx: mx.array, params: SamplingParams, key: mx.array | None,
               processors: Sequence[LogitsProcessor]) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """One draft token ``[1]``, when sampling its full-vocabulary draft probs ``[V]``, and when
        gating the probability the module gave it."""
        logits = self._draft_logits(k, z)
        V = self.model.config.vocab_size
        if processors:
            raw = logits
            if self.vocab is not None:
                full = mx.full((V,), -math.inf, logits.dtype)
                full[self.vocab] = logits
                logits = full
            for proc in processors:
                logits = proc(ctx, logits[None])[0]
            if self.vocab is not None:
                logits = logits[self.vocab]
            # A mask that leaves no draft token (a grammar allowing only ids outside the draft
            # vocabulary) would make q NaN: draft unmasked then; the verify rows reject the draft.
            logits = mx.where(mx.isfinite(logits).any(), logits, raw)
        if params.greedy:
            i = mx.argmax(logits)
            conf = draft_confidence(logits, None) if self.min_confidence > 0 else None
            return (self.vocab[i] if self.vocab is not None else i).astype(mx.int32)[None], None, conf
        q = probs(logits, params)
        i = sample(q, key=key)
        conf = draft_confidence(logits, q) if self.min_confidence > 0 else None
        if self.vocab is None:
            return i.astype(mx.int32)[None], q, conf
        return self.vocab[i].astype(mx.int32)[None], mx.zeros((V,), q.dtype).at[self.vocab].add(q), conf

    def _run(self, history: Sequence[int], draft: bool, params: SamplingParams | None, key: mx.array | None,
             processors: Sequence[LogitsProcessor]) -> Drafts:
        N = len(history)
        R = self.rows
        if draft and R != N - 1:
            raise RuntimeError(f"drafting needs trunk rows for all but the pending token ({R} rows, {N} tokens)")
        drafts: list[mx.array] = []
        qs: list[mx.array] = []
        keys = mx.random.split(key, self.depth) if (draft and key is not None) else [None] * self.depth
        inp, committed_hi = self.inputs[0], R
        drafting, run = draft, None  # run: product of the kept drafts' confidences
        for k in range(self.depth):
            lo = self.done[k]
            # after a gated-out draft the later modules wait: their rows stay pending for the next step
            hi = (R - 1 if drafting else lo - 1) if draft else min(R - 1, N - k - 2)
            out = None
            if hi >= lo:
                # rows lo..hi embed tokens lo+k+1..hi+k+1: known history first, then drafts
                known = [history[i] for i in range(lo + k + 1, min(hi + k + 2, N))]
                parts = [mx.array(known, dtype=mx.int32)] if known else []
                parts += drafts[max(0, lo + k + 1 - N): hi + k + 2 - N]
                toks = mx.concatenate(parts) if len(parts) > 1 else parts[0]
                out = self.model.mtp_step(k, toks[None], inp[:, : hi - lo + 1], self.caches[k])
                self.calls[k] += 1
                if draft:
                    ctx = mx.concatenate([mx.array(list(history), dtype=mx.int32), *drafts]) if processors else None
                    tok, q, conf = self._draft(k, out[:, -1:], ctx, params, keys[k], processors)
                    tok = root_tokens(self.model, tok)
                    if self.min_confidence > 0:
                        run = conf if run is None else run * conf
                        drafting = confident(self.model, run, self.min_confidence)
                if drafting:
                    drafts.append(tok)
                    if q is not None:
                        qs.append(q)
            new_done = max(lo, min(hi + 1, N - k - 1))
            if out is not None:
                self.caches[k].trim(hi + 1 - new_done)
            self.inputs[k] = inp[:, new_done - lo : committed_hi - lo] if inp is not None else None
            self.done[k] = new_done
            if k + 1 < self.depth:
                pending = self.inputs[k + 1]
                parts = [a for a in (pending, out) if a is not None]
                inp = mx.concatenate(parts, axis=1) if len(parts) > 1 else (parts[0] if parts else None)
                committed_hi = new_done
        tokens = mx.concatenate(drafts) if drafts else mx.zeros((0,), mx.int32)
        return Drafts(tokens, mx.stack(qs) if qs else None)

    def absorb(self, history: Sequence[int]) -> None:
        """Process every row whose tokens are all known (prefill); proposes nothing."""
        self._run(history, False, None, None, ())

    def propose(self, history: Sequence[int], params: SamplingParams, key: mx.array | None,
                processors: Sequence[LogitsProcessor] = ()) -> Drafts:
        """Draft ``depth`` tokens after ``history`` (whose last token is pending in the trunk); nothing is read back."""
        return self._run(history, True, params, key, processors)


def _target_logits(logits: mx.array, history: list[int], drafts: mx.array,
                   processors: Sequence[LogitsProcessor]) -> mx.array:
    """Verify rows' logits, each passed through the processors with the tokens before that row."""
    if not processors:
        return logits
    rows = []
    hist = mx.array(history, dtype=mx.int32)
    for i in range(logits.shape[0]):
        row = logits[i]
        ctx = mx.concatenate([hist, drafts[:i]])
        for proc in processors:
            row = proc(ctx, row[None])[0]
        rows.append(row)
    return mx.stack(rows)


def speculative_tokens(
    model: Model,
    cache: list,
    prompt: mx.array,
    params: SamplingParams,
    *,
    depth: int,
    key: mx.array | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = (),
    prefill_step: int = 512,
    on_prefilled: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stats: SpecStats | None = None,
    history: Sequence[int] | None = None,
    drafter: MTPDrafter | None = None,
    draft_vocab: mx.array | None = None,
    min_confidence: float = 0.0,
) -> Iterator[int]:
    """Yield generated token ids, verifying ``depth`` MTP drafts per trunk forward.

    Same protocol as plain decoding (``decode.ar_tokens``): ``prompt`` (1-D) is prefilled
    into ``cache``, whose earlier contents are ``history[:-len(prompt)]`` (default: none);
    ``on_prefilled`` runs once the prompt is in the cache; ``should_stop()``, asked before each
    prefill chunk, ends the generator without a token when True. When the consumer stops, the
    cache holds the prompt and exactly the tokens yielded (rows verified past the last
    yielded token are trimmed; a last token not yet verified is fed). Pass the ``drafter``
    of the previous call to keep the MTP caches across turns; one that does not line up
    with the cache is restarted at the prompt (only the first drafts' acceptance suffers).
    ``draft_vocab``: ids a new drafter drafts over (see :mod:`step35_mlx.draft_vocab`);
    ``min_confidence``: its draft-length gate (see :mod:`step35_mlx.draft_gate`).
    Each step builds drafts, verify forward and acceptance lazily and reads back once (plus one
    read per drafting module when gated).
    """
    if key is None:
        key = mx.random.key(int(mx.random.randint(0, 2**31 - 1, ()).item()))
    processors = list(logits_processors or ())
    prompt = prompt.reshape(-1)
    prompt_ids = [int(t) for t in prompt.tolist()]
    tokens = [int(t) for t in history] if history is not None else list(prompt_ids)
    if tokens[len(tokens) - len(prompt_ids):] != prompt_ids:
        raise ValueError("history must end with the prompt")
    start = len(tokens) - len(prompt_ids)
    if drafter is None:
        drafter = MTPDrafter(model, depth, start=start, vocab=draft_vocab, min_confidence=min_confidence)
    elif drafter.rows != start or drafter.depth != depth:
        drafter.__init__(model, depth, start=start, slack=drafter.slack, vocab=drafter.vocab,
                         min_confidence=drafter.min_confidence)
    hidden = None
    for s in range(0, len(prompt_ids), prefill_step):
        if should_stop is not None and should_stop():
            return
        hidden = model.trunk(prompt[None, s : s + prefill_step], cache)
        drafter.add_hidden(hidden)
        drafter.absorb(tokens)
        mx.eval(hidden)
    if on_prefilled is not None:
        on_prefilled()
    key, sub = mx.random.split(key)
    first = _target_logits(model.logits(hidden[:, -1:])[0], tokens, mx.zeros((0,), mx.int32), processors)
    tokens.append(int(root_tokens(model, sample_token(first, params, sub).astype(mx.int32))[0].item()))
    extra, last_in_cache = 0, False  # cache rows past the last yielded token; is that token's row cached?
    try:
        yield tokens[-1]
        while True:
            key, k_draft, k_verify = mx.random.split(key, 3)
            drafts = drafter.propose(tokens, params, k_draft, processors)
            hidden = model.trunk(mx.concatenate([mx.array([tokens[-1]], dtype=mx.int32), drafts.tokens])[None],
                                 cache)
            rows = _target_logits(model.logits(hidden)[0], tokens, drafts.tokens, processors)
            verdict = (_accept_greedy(rows, drafts.tokens) if params.greedy
                       else _accept(probs(rows, params), drafts.q, drafts.tokens, k_verify))
            step = root_tokens(model, mx.concatenate([verdict, drafts.tokens]).astype(mx.int32))
            n, nxt, *proposed = step.tolist()  # the step's one read
            for c in cache:
                c.trim(len(proposed) - n)
            drafter.add_hidden(hidden[:, : n + 1])
            if stats is not None:
                stats.record(n, len(proposed))
            for i, t in enumerate(proposed[:n] + [nxt]):
                tokens.append(t)
                extra, last_in_cache = (n - i - 1, True) if i < n else (0, False)
                yield t
    finally:
        if extra:
            for c in cache:
                c.trim(extra)
            drafter.drop_rows(extra)
        if not last_in_cache:
            drafter.add_hidden(model.trunk(mx.array([[tokens[-1]]]), cache))


class MTPDecoder:
    """A token generator (``decode.TokenGenerator`` protocol) that decodes with MTP drafts.

    Holds the acceptance statistics of its runs, for the stats line and ``tune``. Drafts use
    the reduced vocabulary stored with the model's folder when there is one (``draft_vocab.json``)
    and the draft gate of its ``draft.json``.
    """

    def __init__(self, depth: int):
        self.depth = depth
        self.stats = SpecStats(depth)

    def __call__(self, model: Model, cache: list, prompt: mx.array, params: SamplingParams, *,
                 key: mx.array | None = None, logits_processors: Sequence[LogitsProcessor] | None = None,
                 prefill_step: int = 512, on_prefilled: Callable[[], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[int]:
        return speculative_tokens(model, cache, prompt, params, depth=self.depth, key=key,
                                  logits_processors=logits_processors, prefill_step=prefill_step,
                                  on_prefilled=on_prefilled, should_stop=should_stop, stats=self.stats,
                                  draft_vocab=default_draft_ids(model),
                                  min_confidence=stored_gate(model))
