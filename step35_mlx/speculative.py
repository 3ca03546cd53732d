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

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from .distributed.sync import root_ints
from .model import DEFAULT_SLACK, Model
from .sampling import SamplingParams, probs, residual, sample

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class SpecStats:
    """Acceptance per draft position and tokens per verify, for reporting and tuning."""

    depth: int
    verifies: int = 0
    emitted: int = 0
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proposed = [0] * self.depth
        self.accepted = [0] * self.depth

    def record(self, n_accepted: int, n_drafts: int) -> None:
        self.verifies += 1
        self.emitted += n_accepted + 1
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


def accept_drafts(p: mx.array, q: mx.array, drafts: Sequence[int], key: mx.array) -> tuple[int, int]:
    """Leviathan-Chen acceptance. ``p``: target probs ``[d + 1, V]``; ``q``: draft probs ``[d, V]``.

    Returns (number of drafts accepted, the next token: a resample from the residual
    at the first rejection, or a bonus draw from ``p[d]`` when all drafts pass).
    """
    d = len(drafts)
    k_u, k_s = mx.random.split(key)
    if d:
        idx = mx.array(list(drafts))
        rows = mx.arange(d)
        ratio = p[rows, idx] / q[rows, idx]
        u = mx.random.uniform(shape=(d,), key=k_u)
        rejected = (u >= mx.minimum(ratio, 1.0)).tolist()
        n = rejected.index(True) if True in rejected else d
    else:
        n = 0
    dist = residual(p[n], q[n]) if n < d else p[n]
    return n, int(sample(dist, key=k_s).item())


class MTPDrafter:
    """Keeps MTP modules 0..depth-1 in step with committed tokens and proposes drafts.

    ``done[k]``: rows committed in module k's cache. ``inputs[k]``: previous-stage rows
    from ``done[k]`` that module k has not consumed yet (trunk hidden rows for k = 0).
    """

    def __init__(self, model: Model, depth: int, start: int = 0, slack: int = DEFAULT_SLACK):
        if not 1 <= depth <= model.num_mtp:
            raise ValueError(f"draft depth must be in [1, {model.num_mtp}] for this checkpoint, got {depth}")
        if depth > slack:
            raise ValueError(f"draft depth {depth} exceeds the cache slack {slack}")
        self.model = model
        self.depth = depth
        self.slack = slack
        self.reset(start)

    def reset(self, start: int) -> None:
        """Empty MTP caches whose first row is trunk position ``start``.

        Starting mid-sequence (e.g. after a chat history was rewritten) only lowers the
        first drafts' acceptance: verification keeps the output exact whatever is drafted.
        """
        self.caches = self.model.make_mtp_cache(self.slack)[: self.depth]
        self.done = [start] * self.depth
        self.inputs: list[mx.array | None] = [None] * self.depth

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

    def _run(self, history: Sequence[int], draft: bool, params: SamplingParams | None, key: mx.array | None,
             processors: Sequence[LogitsProcessor]) -> tuple[list[int], list[mx.array]]:
        N = len(history)
        R = self.rows
        if draft and R != N - 1:
            raise RuntimeError(f"drafting needs trunk rows for all but the pending token ({R} rows, {N} tokens)")
        drafts: list[int] = []
        qs: list[mx.array] = []
        keys = mx.random.split(key, self.depth) if (draft and key is not None) else [None] * self.depth
        inp, committed_hi = self.inputs[0], R
        for k in range(self.depth):
            lo = self.done[k]
            hi = R - 1 if draft else min(R - 1, N - k - 2)
            out = None
            if hi >= lo:
                toks = [history[r + k + 1] if r + k + 1 < N else drafts[r + k + 1 - N] for r in range(lo, hi + 1)]
                out = self.model.mtp_step(k, mx.array([toks]), inp[:, : hi - lo + 1], self.caches[k])
                if draft:
                    logits = self.model.mtp_head(k, out[:, -1:])[0, -1]
                    ctx = mx.array(list(history) + drafts)
                    for proc in processors:
                        logits = proc(ctx, logits[None])[0]
                    q = probs(logits, params)
                    tok = int(mx.argmax(q).item()) if params.greedy else int(sample(q, key=keys[k]).item())
                    tok = root_ints(self.model, [tok])[0]
                    drafts.append(tok)
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
        return drafts, qs

    def absorb(self, history: Sequence[int]) -> None:
        """Process every row whose tokens are all known (prefill); proposes nothing."""
        self._run(history, False, None, None, ())

    def propose(self, history: Sequence[int], params: SamplingParams, key: mx.array | None,
                processors: Sequence[LogitsProcessor] = ()) -> tuple[list[int], list[mx.array]]:
        """Draft ``depth`` tokens after ``history`` (whose last token is pending in the trunk)."""
        return self._run(history, True, params, key, processors)


def _target_probs(logits: mx.array, history: list[int], drafts: list[int], params: SamplingParams,
                  processors: Sequence[LogitsProcessor]) -> mx.array:
    """Target distribution for each verify row, with processors seeing the tokens before that row."""
    if not processors:
        return probs(logits, params)
    rows = []
    for i in range(logits.shape[0]):
        row = logits[i]
        ctx = mx.array(history + drafts[:i])
        for proc in processors:
            row = proc(ctx, row[None])[0]
        rows.append(row)
    return probs(mx.stack(rows), params)


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
    stats: SpecStats | None = None,
    history: Sequence[int] | None = None,
    drafter: MTPDrafter | None = None,
) -> Iterator[int]:
    """Yield generated token ids, verifying ``depth`` MTP drafts per trunk forward.

    Same protocol as plain decoding (``generate.ar_tokens``): ``prompt`` (1-D) is prefilled
    into ``cache``, whose earlier contents are ``history[:-len(prompt)]`` (default: none);
    ``on_prefilled`` runs once the prompt is in the cache. When the consumer stops, the
    cache holds the prompt and exactly the tokens yielded (rows verified past the last
    yielded token are trimmed; a last token not yet verified is fed). Pass the ``drafter``
    of the previous call to keep the MTP caches across turns; one that does not line up
    with the cache is restarted at the prompt (only the first drafts' acceptance suffers).
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
        drafter = MTPDrafter(model, depth, start=start)
    elif drafter.rows != start or drafter.depth != depth:
        drafter.__init__(model, depth, start=start, slack=drafter.slack)
    hidden = None
    for s in range(0, len(prompt_ids), prefill_step):
        hidden = model.trunk(prompt[None, s : s + prefill_step], cache)
        drafter.add_hidden(hidden)
        drafter.absorb(tokens)
        mx.eval(hidden)
    if on_prefilled is not None:
        on_prefilled()
    key, sub = mx.random.split(key)
    first = _target_probs(model.logits(hidden[:, -1:])[0], tokens, [], params, processors)[0]
    tokens.append(root_ints(model, [int(mx.argmax(first).item()) if params.greedy else int(sample(first, key=sub).item())])[0])
    extra, last_in_cache = 0, False  # cache rows past the last yielded token; is that token's row cached?
    try:
        yield tokens[-1]
        while True:
            key, k_draft, k_verify = mx.random.split(key, 3)
            drafts, qs = drafter.propose(tokens, params, k_draft, processors)
            hidden = model.trunk(mx.array([[tokens[-1]] + drafts]), cache)
            p = _target_probs(model.logits(hidden)[0], tokens, drafts, params, processors)
            n, nxt = root_ints(model, list(accept_drafts(p, mx.stack(qs), drafts, k_verify)))
            for c in cache:
                c.trim(len(drafts) - n)
            drafter.add_hidden(hidden[:, : n + 1])
            if stats is not None:
                stats.record(n, len(drafts))
            for i, t in enumerate(drafts[:n] + [nxt]):
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
    """A token generator (``generate.TokenGenerator`` protocol) that decodes with MTP drafts.

    Holds the acceptance statistics of its runs, for the stats line and ``tune``.
    """

    def __init__(self, depth: int):
        self.depth = depth
        self.stats = SpecStats(depth)

    def __call__(self, model: Model, cache: list, prompt: mx.array, params: SamplingParams, *,
                 key: mx.array | None = None, logits_processors: Sequence[LogitsProcessor] | None = None,
                 prefill_step: int = 512, on_prefilled: Callable[[], None] | None = None) -> Iterator[int]:
        return speculative_tokens(model, cache, prompt, params, depth=self.depth, key=key,
                                  logits_processors=logits_processors, prefill_step=prefill_step,
                                  on_prefilled=on_prefilled, stats=self.stats)
