"""KV caches: a growing cache for full-attention layers and a ring cache for sliding layers.

Both are built for speculative decoding: ``trim(n)`` removes the last ``n`` tokens
exactly. The sliding ring keeps ``window + slack`` slots, so a rejected draft of up
to ``slack`` tokens is a plain trim even after the ring has wrapped. Every slot's
position is derived from the offset (slot = position mod capacity), so masks are
computed from positions and never depend on what a stale slot holds.

Protocol used by the attention layers:
``make_mask(T)`` (before the update) gives the mask for the key layout that
``update_and_fetch(keys, values)`` will return for ``T`` new tokens.

With ``bits`` set, keys and values are stored quantized (``mx.quantize`` along the
head dim, affine, ``group_size``) and returned as ``(packed, scales, biases)`` tuples,
which the attention layer multiplies with ``mx.quantized_matmul``. Ring bookkeeping,
masks and rollback are the same for both storage forms.
"""

from __future__ import annotations

from typing import Union

import mlx.core as mx
import numpy as np

Mask = Union[None, str, mx.array]
Stored = Union[mx.array, tuple]  # a float array, or (packed, scales, biases) when quantized


def _parts(x: Stored) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _pack(parts: tuple, like: Stored) -> Stored:
    return tuple(parts) if isinstance(like, tuple) else parts[0]


def _slice(x: Stored, start: int | None, stop: int | None) -> Stored:
    """Positions [start, stop) along the sequence axis (2) of every part."""
    return _pack(tuple(a[..., start:stop, :] for a in _parts(x)), x)


def _concat(xs: list[Stored]) -> Stored:
    parts = list(zip(*(_parts(x) for x in xs)))
    return _pack(tuple(mx.concatenate(list(p), axis=2) for p in parts), xs[0])


def _assign(buf: Stored, start: int, stop: int, x: Stored) -> None:
    for b, a in zip(_parts(buf), _parts(x)):
        b[..., start:stop, :] = a


def _zeros_like_len(x: Stored, length: int) -> Stored:
    return _pack(tuple(mx.zeros((*a.shape[:2], length, a.shape[3]), a.dtype) for a in _parts(x)), x)


def _length(x: Stored) -> int:
    return _parts(x)[0].shape[2]


def _nbytes(x: Stored | None) -> int:
    return 0 if x is None else sum(a.nbytes for a in _parts(x))


class _Quantizer:
    """Stores K/V as float (``bits=None``) or quantized along the head dim."""

    def __init__(self, bits: int | None, group_size: int):
        if bits is not None and bits not in (4, 8):
            raise ValueError(f"kv bits must be 4, 8 or None, got {bits}")
        self.bits = bits
        self.group_size = group_size

    def store(self, x: mx.array) -> Stored:
        if self.bits is None:
            return x
        if x.shape[-1] % self.group_size:
            raise ValueError(f"head dim {x.shape[-1]} is not a multiple of the kv group size {self.group_size}")
        return tuple(mx.quantize(x, self.group_size, self.bits))


def window_mask(q_pos: mx.array, k_pos: mx.array, window: int | None) -> mx.array:
    """Boolean [T, L] mask: key visible iff it is not in the future and, with a window, within it."""
    q = q_pos[:, None]
    k = k_pos[None, :]
    keep = k <= q
    if window is not None:
        keep = keep & (k > q - window)
    return keep


class KVCache(_Quantizer):
    """Cache for full-attention layers; grows in steps of ``step`` positions."""

    step = 256

    def __init__(self, bits: int | None = None, group_size: int = 64) -> None:
        super().__init__(bits, group_size)
        self.keys: Stored | None = None
        self.values: Stored | None = None
        self.offset = 0

    def make_mask(self, T: int) -> Mask:
        return None if T == 1 else "causal"

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        keys, values = self.store(keys), self.store(values)
        T = _length(keys)
        end = self.offset + T
        if self.keys is None or end > _length(self.keys):
            grow = ((end + self.step - 1) // self.step) * self.step
            new_k, new_v = _zeros_like_len(keys, grow), _zeros_like_len(values, grow)
            if self.keys is not None and self.offset > 0:
                _assign(new_k, 0, self.offset, _slice(self.keys, 0, self.offset))
                _assign(new_v, 0, self.offset, _slice(self.values, 0, self.offset))
            self.keys, self.values = new_k, new_v
        _assign(self.keys, self.offset, end, keys)
        _assign(self.values, self.offset, end, values)
        self.offset = end
        return _slice(self.keys, 0, end), _slice(self.values, 0, end)

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
        return _nbytes(self.keys) + _nbytes(self.values)


class SlidingKVCache(_Quantizer):
    """Ring cache for sliding-window layers with ``window + slack`` slots.

    ``low`` is the lowest position whose data is still intact; it lets ``trim``
    refuse (rather than silently corrupt) a rollback the ring can no longer undo.
    """

    def __init__(self, window: int, slack: int = 8, bits: int | None = None, group_size: int = 64) -> None:
        super().__init__(bits, group_size)
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
        if self._in_place(T):
            # Decode and short verify steps: build the small [T, <= capacity] mask on the host,
            # one constant array instead of ~18 graph nodes per step.
            C = self.capacity
            s = np.arange(min(end, C))
            k = s + C * ((end - 1 - s) // C)
            q = np.arange(self.offset, end)[:, None]
            return mx.array((k <= q) & (k > q - self.window))
        q = mx.arange(self.offset, end)
        return window_mask(q, self._layout_positions(T), self.window)

    def _ordered(self, buf: Stored) -> Stored:
        """Ring contents in position order: the last min(offset, capacity) positions."""
        C = self.capacity
        if self.offset <= C:
            return _slice(buf, 0, self.offset)
        start = self.offset % C
        return _concat([_slice(buf, start, None), _slice(buf, 0, start)])

    def _write(self, buf: Stored, x: Stored) -> None:
        C = self.capacity
        T = _length(x)
        start = self.offset % C
        first = min(T, C - start)
        _assign(buf, start, start + first, _slice(x, 0, first))
        if first < T:
            _assign(buf, 0, T - first, _slice(x, first, None))

    def _rebuild(self, full: Stored, total: int) -> Stored:
        """Ring holding the last min(total, capacity) positions of ``full`` at slot = position mod C."""
        C = self.capacity
        if total <= C:
            tail = _slice(full, _length(full) - total, None)
            if total == C:
                return tail
            return _concat([tail, _zeros_like_len(tail, C - total)])
        tail = _slice(full, _length(full) - C, None)
        start = total % C
        if start == 0:
            return tail
        return _concat([_slice(tail, C - start, None), _slice(tail, 0, C - start)])

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Stored, Stored]:
        keys, values = self.store(keys), self.store(values)
        T = _length(keys)
        end = self.offset + T
        if self.keys is None:
            self.keys = _zeros_like_len(keys, self.capacity)
            self.values = _zeros_like_len(values, self.capacity)
        if self._in_place(T):
            self._write(self.keys, keys)
            self._write(self.values, values)
            self.offset = end
            self.low = max(self.low, end - self.capacity)
            L = min(end, self.capacity)
            return _slice(self.keys, 0, L), _slice(self.values, 0, L)
        full_k = _concat([self._ordered(self.keys), keys])
        full_v = _concat([self._ordered(self.values), values])
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
        return _nbytes(self.keys) + _nbytes(self.values)
