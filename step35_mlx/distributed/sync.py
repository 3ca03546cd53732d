"""Rank 0 decides every generated token; the other ranks take its choice.

With identical logits and seeds all ranks would draw the same tokens anyway; taking
rank 0's makes that a guarantee, whatever the summation order did to the last bits.
A model without ``token_group`` (single process) passes through untouched.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


def root_tokens(model: Any, x: mx.array) -> mx.array:
    """``x`` (integer token ids) as computed on rank 0 of ``model.token_group``."""
    group = getattr(model, "token_group", None)
    if group is None or group.size() == 1:
        return x
    # x * 0, not zeros: the other ranks must still compute x (its graph holds their collectives).
    mine = x if group.rank() == 0 else x * 0
    return mx.distributed.all_sum(mine, group=group)


def root_ints(model: Any, values: list[int]) -> list[int]:
    """Python ints as rank 0 has them."""
    group = getattr(model, "token_group", None)
    if group is None or group.size() == 1:
        return values
    return [int(v) for v in root_tokens(model, mx.array(values, dtype=mx.int32)).tolist()]
