"""What one cached prefix holds besides its shared full-layer blocks: sliding-ring snapshots and a block tail.

A sliding layer's ring at position ``n`` cannot be rebuilt from the blocks (it would need
the keys of positions that a longer conversation's ring has overwritten), so every cached
prefix carries a copy of each ring as it was at ``n``, with the ring's ``offset``/``low``.
Restored, the ring can roll back exactly as far as ``SlidingKVCache.max_trim`` allows (its
slack), which is how a prompt that diverges a few tokens before ``n`` still hits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..cache import SlidingKVCache, _nbytes, _parts


def copy_stored(x: Any) -> Any:
    """New array objects with the same contents (caches update their own arrays in place)."""
    parts = tuple(mx.array(a) for a in _parts(x))
    return parts if isinstance(x, tuple) else parts[0]


@dataclass
class RingSnapshot:
    """One sliding layer's ring: its arrays (float, or packed/scales/biases) and the positions it holds."""

    keys: Any
    values: Any
    offset: int
    low: int

    @classmethod
    def take(cls, c: SlidingKVCache) -> "RingSnapshot":
        return cls(copy_stored(c.keys), copy_stored(c.values), c.offset, c.low)

    def put(self, c: SlidingKVCache, length: int) -> None:
        """Make ``c`` the ring at position ``length`` (``<= offset``, within ``max_trim``)."""
        c.keys, c.values = copy_stored(self.keys), copy_stored(self.values)
        c.offset, c.low = self.offset, self.low
        c.trim(self.offset - length)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


def ring_max_back(c: SlidingKVCache, offset: int, low: int) -> int:
    """How many positions a ring of ``c``'s shape at ``offset``/``low`` can roll back exactly."""
    probe = SlidingKVCache(c.window, c.slack)
    probe.offset, probe.low = offset, low
    return probe.max_trim()
