"""KV caches: a growing cache for full-attention layers and a ring cache for sliding layers.

Both are built for speculative decoding: ``trim(n)`` removes the last ``n`` tokens
exactly. The sliding ring keeps ``window + slack`` slots, so a rejected draft of up
to ``slack`` tokens is a plain trim even after the ring has wrapped. Every slot's
position is derived from the offset (slot = position mod capacity), so masks are
computed from positions and never depend on what a stale slot holds.

Protocol used by the attention layers:
``make_mask(T)`` (before the update) gives the mask for the key layout that
``update_and_fetch(keys, values)`` will return for ``T`` new tokens.
"""

from __future__ import annotations

from typing import Union

import mlx.core as mx

Mask = Union[None, str, mx.array]


def window_mask(q_pos: mx.array, k_pos: mx.array, window: int | None) -> mx.array:
    """Boolean [T, L] mask: key visible iff it is not in the future and, with a window, within it."""
    q = q_pos[:, None]
    k = k_pos[None, :]
    keep = k <= q
    if window is not None:
        keep = keep & (k > q - window)
    return keep


class KVCache:
    """Cache for full-attention layers; grows in steps of ``step`` positions."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def make_mask(self, T: int) -> Mask:
        return None if T == 1 else "causal"

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, T, D = keys.shape
        end = self.offset + T
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((end + self.step - 1) // self.step) * self.step
            shape_k = (B, H, grow, D)
            shape_v = (B, H, grow, values.shape[3])
            new_k = mx.zeros(shape_k, keys.dtype)
            new_v = mx.zeros(shape_v, values.dtype)
            if self.keys is not None and self.offset > 0:
                new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
                new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def max_trim(self) -> int:
        return self.offset

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens; exact for any ``n <= offset``."""
        if not 0 <= n <= self.max_trim():
            raise ValueError(f"cannot trim {n} tokens from a cache holding {self.offset}")
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class SlidingKVCache:
    """Ring cache for sliding-window layers with ``window + slack`` slots.

    ``low`` is the lowest position whose data is still intact; it lets ``trim``
    refuse (rather than silently corrupt) a rollback the ring can no longer undo.
    """

    def __init__(self, window: int, slack: int = 8) -> None:
        if window <= 0 or slack < 0:
            raise ValueError("window must be positive and slack non-negative")
        self.window = window
        self.slack = slack
        self.capacity = window + slack
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.low = 0

    def _in_place(self, T: int) -> bool:
        """Whether T new tokens can be written into the ring before attention."""
        return T <= self.slack + 1

    def _layout_positions(self, T: int) -> mx.array:
        """Positions of the keys that ``update_and_fetch`` returns for T new tokens."""
        end = self.offset + T
        C = self.capacity
        if self._in_place(T):
            L = min(end, C)
            s = mx.arange(L)
            return s + C * ((end - 1 - s) // C)
        m = min(self.offset, C)
        return mx.arange(self.offset - m, end)

    def make_mask(self, T: int) -> Mask:
        end = self.offset + T
        if self._in_place(T) and end <= self.capacity and end <= self.window:
            return None if T == 1 else "causal"
        q = mx.arange(self.offset, end)
        return window_mask(q, self._layout_positions(T), self.window)

    def _allocate(self, keys: mx.array, values: mx.array) -> None:
        B, H, _, D = keys.shape
        self.keys = mx.zeros((B, H, self.capacity, D), keys.dtype)
        self.values = mx.zeros((B, H, self.capacity, values.shape[3]), values.dtype)

    def _ordered(self, buf: mx.array) -> mx.array:
        """Ring contents in position order: the last min(offset, capacity) positions."""
        C = self.capacity
        if self.offset <= C:
            return buf[..., : self.offset, :]
        start = self.offset % C
        return mx.concatenate([buf[..., start:, :], buf[..., :start, :]], axis=2)

    def _write(self, buf: mx.array, x: mx.array) -> None:
        C = self.capacity
        T = x.shape[2]
        start = self.offset % C
        first = min(T, C - start)
        buf[..., start : start + first, :] = x[..., :first, :]
        if first < T:
            buf[..., : T - first, :] = x[..., first:, :]

    def _rebuild(self, full: mx.array, total: int) -> mx.array:
        """Ring holding the last min(total, capacity) positions of ``full`` at slot = position mod C."""
        C = self.capacity
        if total <= C:
            tail = full[..., -total:, :]
            if total == C:
                return tail
            pad = mx.zeros((*tail.shape[:2], C - total, tail.shape[3]), tail.dtype)
            return mx.concatenate([tail, pad], axis=2)
        tail = full[..., -C:, :]
        start = total % C
        if start == 0:
            return tail
        return mx.concatenate([tail[..., C - start :, :], tail[..., : C - start, :]], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        T = keys.shape[2]
        end = self.offset + T
        if self.keys is None:
            self._allocate(keys, values)
        if self._in_place(T):
            self._write(self.keys, keys)
            self._write(self.values, values)
            self.offset = end
            self.low = max(self.low, end - self.capacity)
            L = min(end, self.capacity)
            return self.keys[..., :L, :], self.values[..., :L, :]
        full_k = mx.concatenate([self._ordered(self.keys), keys], axis=2)
        full_v = mx.concatenate([self._ordered(self.values), values], axis=2)
        self.keys = self._rebuild(full_k, end)
        self.values = self._rebuild(full_v, end)
        self.offset = end
        self.low = max(self.low, end - self.capacity)
        return full_k, full_v

    def max_trim(self) -> int:
        """Largest n for which ``trim(n)`` is exact: the next query needs window - 1 intact keys."""
        if self.low == 0:
            return self.offset
        return max(0, self.offset - self.window + 1 - self.low)

    def trim(self, n: int) -> int:
        if not 0 <= n <= self.max_trim():
            raise ValueError(
                f"cannot trim {n} tokens from a sliding cache (offset {self.offset}, at most "
                f"{self.max_trim()} can be rolled back exactly; slack is {self.slack})"
            )
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes
