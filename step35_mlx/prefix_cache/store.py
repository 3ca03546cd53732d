"""The prefix cache: entries (cached prefixes) over shared full-layer blocks, in RAM and on disk."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from ..cache import SlidingKVCache, _concat, _nbytes, _parts, _slice
from ..session_file import _expected_shapes
from .disk import DamagedFile, DiskTier
from .snapshots import RingSnapshot, copy_stored, ring_max_back

DEFAULT_BLOCK = 128  # positions per full-layer block
DEFAULT_CACHE_DIR = Path("~/.cache/step35-mlx/kv")


def model_fingerprint(model: Any) -> str:
    """Hash of the model's config and a sample of its embedding weights (tells apart same-shape checkpoints)."""
    raw = getattr(model.config, "raw", None) or {}
    h = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode())
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    for name in ("weight", "scales", "biases"):
        w = getattr(emb, name, None) if emb is not None else None
        if isinstance(w, mx.array):
            h.update(np.asarray(w[:2].astype(mx.float32)).tobytes())
    return h.hexdigest()[:16]


def activation_dtype(model: Any) -> mx.Dtype:
    """The float type of the hidden states, hence of float K/V: the embedding's (its scales' when quantized)."""
    emb = model.model.embed_tokens
    w = emb.weight
    return w.dtype if mx.issubdtype(w.dtype, mx.floating) else emb.scales.dtype


@dataclass
class Hit:
    """The result of a lookup: ``length`` prompt tokens restored into the cache (0: a miss), and from which tier."""

    length: int = 0
    tier: str = ""  # "ram" or "disk"


@dataclass
class CacheUsage:
    """Bytes and entries held, and lookup counts, for the stats line and the benchmark."""

    ram_bytes: int
    disk_bytes: int
    ram_entries: int
    disk_entries: int
    blocks: int
    hits: int
    misses: int


@dataclass
class _Entry:
    key: str
    tokens: np.ndarray
    blocks: list[str]
    max_back: int
    tail: dict[int, tuple[Any, Any]]  # full layer -> K/V of the positions after the last whole block
    rings: dict[int, RingSnapshot]
    on_disk: bool = False

    @property
    def own_bytes(self) -> int:
        return (sum(_nbytes(k) + _nbytes(v) for k, v in self.tail.values())
                + sum(r.nbytes for r in self.rings.values()))


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


def _flatten(prefix: str, k: Any, v: Any, out: dict[str, mx.array]) -> None:
    for name, stored in (("k", k), ("v", v)):
        for j, a in enumerate(_parts(stored)):
            out[f"{prefix}.{name}.{j}"] = a


def _unflatten(prefix: str, arrays: dict[str, mx.array], n_parts: int) -> tuple[Any, Any]:
    def get(name: str) -> Any:
        parts = tuple(arrays[f"{prefix}.{name}.{j}"] for j in range(n_parts))
        return parts if n_parts > 1 else parts[0]
    return get("k"), get("v")


class PrefixCache:
    """Cached KV state of many prompts, reused across requests, conversations, clients and restarts.

    ``PrefixCache(model, ram_bytes=8e9, disk_bytes=0, cache_dir=None, kv_bits=None, kv_group_size=None)``.
    ``restore(ids, cache)`` puts the longest cached usable prefix of ``ids`` into ``cache``;
    ``capture(cache, tokens)`` stores the state of a cache holding exactly ``tokens``;
    ``flush()`` writes what is not on disk yet. Thread-safe (one lock).
    """

    def __init__(self, model: Any, *, ram_bytes: int = 8 * 10**9, disk_bytes: int = 0,
                 cache_dir: str | Path | None = None, block_size: int = DEFAULT_BLOCK, kv_bits: int | None = None,
                 kv_group_size: int | None = None, warn: Callable[[str], None] | None = None) -> None:
        from ..decode import new_cache

        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model = model
        self.block = block_size
        self.ram_budget = int(ram_bytes)
        probe = new_cache(model, kv_bits, kv_group_size)
        self.kv_bits = getattr(probe[0], "bits", None)
        self.kv_group = getattr(probe[0], "group_size", 64)
        rings = [c for c in probe if isinstance(c, SlidingKVCache)]
        self.slack = rings[0].slack if rings else 0
        self.dtype = activation_dtype(model)
        self.specs = [model.config.layer(i) for i in range(len(model.layers))]
        self._probe = probe
        fmt = str(self.dtype).rsplit(".", 1)[-1] + ("" if self.kv_bits is None else f"-q{self.kv_bits}g{self.kv_group}")
        self.key = f"{model_fingerprint(model)}-{fmt}-s{self.slack}-b{block_size}"
        self._seed = hashlib.sha256(self.key.encode()).digest()
        self.warn = warn or (lambda m: print(m, file=sys.stderr))
        self.lock = threading.RLock()
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self.blocks: dict[str, dict[int, tuple[Any, Any]]] = {}
        self.block_refs: dict[str, int] = {}
        self.hits = self.misses = 0
        self._dtype_warned = False
        self.disk: DiskTier | None = None
        if disk_bytes > 0:
            folder = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / self.key
            self.disk = DiskTier(folder, int(disk_bytes), self.key, model.config.vocab_size, self._check_index,
                                 self.warn)

    # ------------------------------------------------------------ keys

    def _chain(self, tokens: np.ndarray) -> list[str]:
        """Hash chain over whole blocks: block k's name covers tokens [0, (k + 1) * block)."""
        out, h = [], self._seed
        for k in range(len(tokens) // self.block):
            h = hashlib.sha256(h + tokens[k * self.block:(k + 1) * self.block].tobytes()).digest()
            out.append(h.hex()[:32])
        return out

    def _entry_key(self, tokens: np.ndarray, chain: list[str]) -> str:
        head = bytes.fromhex(chain[-1]) if chain else self._seed
        rest = tokens[len(chain) * self.block:]
        return hashlib.sha256(head + rest.tobytes() + str(len(tokens)).encode()).hexdigest()[:32]

    def _check_index(self, key: str, tokens: np.ndarray, blocks: list[str], rings: dict[int, tuple[int, int]]) -> int:
        """A disk entry's roll-back reach, after checking that its key, block names and rings fit its tokens."""
        chain = self._chain(tokens)
        if blocks != chain or key != self._entry_key(tokens, chain):
            raise DamagedFile("its key or block names do not match its tokens")
        n, reach = len(tokens), [len(tokens)]
        for i, c in enumerate(self._probe):
            if not isinstance(c, SlidingKVCache):
                continue
            offset, low = rings.get(i, (-1, -1))
            if offset != n or not max(0, n - c.capacity) <= low <= n:
                raise DamagedFile(f"ring {i} does not hold position {n}")
            reach.append(ring_max_back(c, offset, low))
        return min(reach)

    # ------------------------------------------------------------ sizes

    def _block_bytes(self, h: str) -> int:
        return sum(_nbytes(k) + _nbytes(v) for k, v in self.blocks[h].values())

    @property
    def ram_bytes(self) -> int:
        """Bytes of every array the RAM tier holds (shared blocks counted once)."""
        with self.lock:
            return sum(self._block_bytes(h) for h in self.blocks) + sum(e.own_bytes for e in self.entries.values())

    def usage(self) -> CacheUsage:
        with self.lock:
            disk = self.disk
            return CacheUsage(self.ram_bytes, disk.nbytes if disk else 0, len(self.entries),
                              len(disk.entries) if disk else 0, len(self.blocks), self.hits, self.misses)

    # ------------------------------------------------------------ capture

    def check_format(self, cache: list) -> None:
        """``ValueError`` unless ``cache`` (a model cache list) has this prefix cache's KV format."""
        def shape(c: Any) -> tuple:
            return type(c), getattr(c, "bits", None), getattr(c, "group_size", None), getattr(c, "capacity", None)

        if [shape(c) for c in cache] != [shape(c) for c in self._probe]:
            raise ValueError("this cache's KV format differs from the prefix cache's (--kv-bits, ring slack)")

    def capture(self, cache: list, tokens: Sequence[int]) -> None:
        """Store the state of ``cache``, which holds exactly ``tokens`` in every layer."""
        if self.ram_budget <= 0 and self.disk is None:
            return
        self.check_format(cache)
        toks = np.asarray(list(tokens), np.int32)
        n = len(toks)
        if n == 0 or any(c.offset != n for c in cache):
            return
        if _parts(cache[0].keys)[-1].dtype != self.dtype:  # would not match this cache's key: never store it
            if not self._dtype_warned:
                self.warn(f"warning: prefix cache: K/V are {_parts(cache[0].keys)[-1].dtype}, expected {self.dtype}; "
                          "nothing is cached")
                self._dtype_warned = True
            return
        with self.lock:
            chain = self._chain(toks)
            key = self._entry_key(toks, chain)
            if key in self.entries:
                self.entries.move_to_end(key)
                return
            if self.disk is not None and key in self.disk.entries:
                self.disk.touch(key)
                return
            B, fresh = self.block, []
            full = [(i, c) for i, c in enumerate(cache) if not isinstance(c, SlidingKVCache)]
            for k, h in enumerate(chain):
                if h not in self.blocks:
                    self.blocks[h] = {i: (copy_stored(_slice(c.keys, k * B, (k + 1) * B)),
                                          copy_stored(_slice(c.values, k * B, (k + 1) * B))) for i, c in full}
                    self.block_refs[h] = 0
                    fresh.append(self.blocks[h])
                self.block_refs[h] += 1
            start = len(chain) * B
            tail = {i: (copy_stored(_slice(c.keys, start, n)), copy_stored(_slice(c.values, start, n)))
                    for i, c in full} if n > start else {}
            rings = {i: RingSnapshot.take(c) for i, c in enumerate(cache) if isinstance(c, SlidingKVCache)}
            max_back = min([ring_max_back(cache[i], r.offset, r.low) for i, r in rings.items()] + [n])
            entry = _Entry(key, toks, chain, max_back, tail, rings)
            self.entries[key] = entry
            mx.async_eval([[k, v] for b in fresh for k, v in b.values()] + [[k, v] for k, v in tail.values()]
                          + [[r.keys, r.values] for r in rings.values()])
            self._fit_ram()

    def _fit_ram(self) -> None:
        """Move least recently used entries out of RAM (to disk when there is a disk tier) until within budget."""
        while self.entries and self.ram_bytes > self.ram_budget:
            key, entry = next(iter(self.entries.items()))
            if self.disk is not None and not entry.on_disk:
                self._write(entry)
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        for h in entry.blocks:
            self.block_refs[h] -= 1
            if self.block_refs[h] == 0:
                del self.blocks[h], self.block_refs[h]

    # ------------------------------------------------------------ disk

    def _write(self, entry: _Entry) -> None:
        arrays: dict[str, mx.array] = {}
        for i, (k, v) in entry.tail.items():
            _flatten(f"t{i}", k, v, arrays)
        for i, r in entry.rings.items():
            _flatten(f"r{i}", r.keys, r.values, arrays)

        def block_arrays(h: str) -> dict[str, mx.array]:
            out: dict[str, mx.array] = {}
            for i, (k, v) in self.blocks[h].items():
                _flatten(f"b{i}", k, v, out)
            return out

        try:
            self.disk.write(entry.key, entry.tokens, entry.blocks, entry.max_back,
                            {i: (r.offset, r.low) for i, r in entry.rings.items()}, arrays, block_arrays)
            entry.on_disk = True
        except OSError as e:
            self.warn(f"warning: prefix cache: cannot write to {self.disk.folder} ({e})")

    def flush(self) -> None:
        """Write every RAM entry that is not on disk yet (no-op without a disk tier)."""
        if self.disk is None:
            return
        with self.lock:
            for entry in list(self.entries.values()):
                if not entry.on_disk:
                    self._write(entry)

    def _check_shapes(self, arrays: dict, prefix: str, layer: int, length: int) -> None:
        expected = _expected_shapes(self.specs[layer], length, self.kv_bits, self.kv_group)
        for name in ("k", "v"):
            for j, (shape, kind) in enumerate(expected):
                a = arrays.get(f"{prefix}.{name}.{j}")
                if a is None:
                    raise DamagedFile(f"array {prefix}.{name}.{j} is missing")
                ok = a.dtype == (mx.uint32 if kind == "uint32" else self.dtype)
                if tuple(a.shape) != shape or not ok:
                    raise DamagedFile(f"array {prefix}.{name}.{j} is {tuple(a.shape)} {a.dtype}; expected {shape}")

    def _load(self, key: str) -> _Entry | None:
        """Read an entry and its blocks from disk into RAM; ``None`` (files removed with a warning) if damaged."""
        d = self.disk.entries[key]
        n_parts = 1 if self.kv_bits is None else 3
        full = [i for i, c in enumerate(self._probe) if not isinstance(c, SlidingKVCache)]
        start = len(d.blocks) * self.block

        def check_entry(arrays: dict) -> None:
            for i in full:
                if len(d.tokens) > start:
                    self._check_shapes(arrays, f"t{i}", i, len(d.tokens) - start)
            for i, c in enumerate(self._probe):
                if isinstance(c, SlidingKVCache):
                    self._check_shapes(arrays, f"r{i}", i, c.capacity)
                    if i not in d.rings:
                        raise DamagedFile(f"ring {i} is missing")

        def check_block(arrays: dict) -> None:
            for i in full:
                self._check_shapes(arrays, f"b{i}", i, self.block)

        try:
            _, arrays = self.disk.load_arrays(d.path, "entry", check_entry)
            loaded: dict[str, dict[int, tuple[Any, Any]]] = {}
            for h in dict.fromkeys(d.blocks):
                if h in self.blocks:
                    continue
                _, barrays = self.disk.load_arrays(self.disk.block_path(h), "block", check_block)
                loaded[h] = {i: _unflatten(f"b{i}", barrays, n_parts) for i in full}
        except (DamagedFile, FileNotFoundError):
            self.disk.remove(key)
            self.disk.rescan()
            return None
        for h, b in loaded.items():
            self.blocks[h], self.block_refs[h] = b, 0
        for h in d.blocks:
            self.block_refs[h] += 1
        tail = {i: _unflatten(f"t{i}", arrays, n_parts) for i in full} if len(d.tokens) > start else {}
        rings = {i: RingSnapshot(*_unflatten(f"r{i}", arrays, n_parts), *d.rings[i]) for i in d.rings}
        entry = _Entry(key, d.tokens, list(d.blocks), d.max_back, tail, rings, on_disk=True)
        self.entries[key] = entry
        self.disk.touch(key)
        return entry

    # ------------------------------------------------------------ lookup

    def _usable(self, tokens: np.ndarray, max_back: int, ids: np.ndarray, limit: int) -> int:
        d = min(_lcp(tokens, ids), limit)
        return d if d > 0 and len(tokens) - d <= max_back else 0

    def restore(self, ids: Sequence[int], cache: list, at_least: int = 0) -> Hit:
        """Fill ``cache`` with the longest cached prefix of ``ids`` longer than ``at_least`` (and shorter than ``ids``).

        On a miss (``Hit().length == 0``) ``cache`` is left as it was.
        """
        self.check_format(cache)
        arr = np.asarray(list(ids), np.int32)
        limit = len(arr) - 1
        with self.lock:
            if self.disk is not None:
                self.disk.rescan()
            while True:
                best, best_key, tier = at_least, None, ""
                for key, e in self.entries.items():
                    d = self._usable(e.tokens, e.max_back, arr, limit)
                    if d > best:
                        best, best_key, tier = d, key, "ram"
                if self.disk is not None:
                    for key, e in self.disk.entries.items():
                        if key in self.entries:
                            continue
                        d = self._usable(e.tokens, e.max_back, arr, limit)
                        if d > best:
                            best, best_key, tier = d, key, "disk"
                if best_key is None:
                    self.misses += 1
                    return Hit()
                entry = self.entries.get(best_key) if tier == "ram" else self._load(best_key)
                if entry is not None:
                    break
            self.entries.move_to_end(best_key)
            if self.disk is not None:
                self.disk.touch(best_key)
            self._put(entry, best, cache)
            self.hits += 1
            self._fit_ram()
            return Hit(best, tier)

    def _put(self, entry: _Entry, length: int, cache: list) -> None:
        n_blocks = -(-length // self.block)
        whole = entry.blocks[:n_blocks]
        for i, c in enumerate(cache):
            if isinstance(c, SlidingKVCache):
                entry.rings[i].put(c, length)
                continue
            ks = [self.blocks[h][i][0] for h in whole]
            vs = [self.blocks[h][i][1] for h in whole]
            if length > len(whole) * self.block:
                ks.append(entry.tail[i][0])
                vs.append(entry.tail[i][1])
            k, v = (_concat(ks), _concat(vs)) if len(ks) > 1 else (copy_stored(ks[0]), copy_stored(vs[0]))
            c.keys, c.values = _slice(k, 0, length), _slice(v, 0, length)
            c.offset = length
        mx.eval([[c.keys, c.values] for c in cache])
