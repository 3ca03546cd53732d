"""The SSD tier: one safetensors file per full-layer block and per cached prefix, in a folder per model and KV format.

Files are written atomically (a temporary ``.name`` file renamed into place, see
:func:`~step35_mlx.session_file.write_session_file`), blocks before the prefix that
names them, so another process never sees a half-written entry: names starting with
``.`` are never read. Every file's metadata repeats the cache key (model fingerprint,
KV format, ring slack, block size); a file that cannot be parsed, is truncated, or
carries another key is reported with a warning and deleted, never loaded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..safetensors_io import SafetensorsError, SafetensorsFile
from ..session_file import write_session_file

FORMAT = "step35-mlx-prefix-cache"
VERSION = 1
META_KEY = "step35_mlx_prefix_cache"


class DamagedFile(ValueError):
    """A cache file that must not be loaded (and is deleted)."""


@dataclass
class DiskEntry:
    """A cached prefix on disk: enough to match it without reading its arrays."""

    key: str
    tokens: np.ndarray
    blocks: list[str]
    max_back: int
    rings: dict[int, tuple[int, int]]  # layer -> (offset, low)
    path: Path
    size: int
    used: float = field(default_factory=time.time)


class DiskTier:
    """Entry and block files under ``folder``, LRU-evicted to stay within ``budget`` bytes."""

    def __init__(self, folder: Path, budget: int, cache_key: str, vocab_size: int,
                 check_index: Callable[[str, np.ndarray, list[str], dict[int, tuple[int, int]]], int],
                 warn: Callable[[str], None]) -> None:
        """``check_index(key, tokens, blocks, rings)`` returns the entry's exact roll-back reach or raises
        ``DamagedFile`` when the index fields do not fit together (the key and block names hash the tokens)."""
        self.folder = folder
        self.budget = budget
        self.cache_key = cache_key
        self.vocab_size = vocab_size
        self.check_index = check_index
        self.warn = warn
        self.entries: dict[str, DiskEntry] = {}
        self.block_sizes: dict[str, int] = {}
        folder.mkdir(parents=True, exist_ok=True)
        self.rescan()

    # ------------------------------------------------------------ index

    def block_path(self, h: str) -> Path:
        return self.folder / f"blk-{h}.safetensors"

    def entry_path(self, key: str) -> Path:
        return self.folder / f"pfx-{key}.safetensors"

    @property
    def nbytes(self) -> int:
        return sum(e.size for e in self.entries.values()) + sum(self.block_sizes.values())

    def rescan(self) -> None:
        """Pick up files other processes wrote (or removed) since the last scan (only new entries are read)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        names = {p.name: p for p in self.folder.iterdir() if not p.name.startswith(".")}
        blocks = {}
        for name, p in names.items():
            if name.startswith("blk-") and name.endswith(".safetensors"):
                try:
                    blocks[name[4:-12]] = p.stat().st_size
                except FileNotFoundError:
                    continue
        self.block_sizes = blocks
        known = {e.path.name for e in self.entries.values()}
        self.entries = {k: e for k, e in self.entries.items() if e.path.name in names}
        for name, p in names.items():
            if name.startswith("pfx-") and name.endswith(".safetensors") and name not in known:
                entry = self._read_index(p)
                if entry is not None:
                    self.entries[entry.key] = entry

    def _read_index(self, path: Path) -> DiskEntry | None:
        try:
            st = path.stat()
            meta = self._meta(SafetensorsFile(path).metadata, path)
            tokens = meta["tokens"]
            if not isinstance(tokens, list) or not tokens or not all(
                    isinstance(t, int) and -(2**31) <= t < self.vocab_size for t in tokens):  # < 0: image keys
                raise DamagedFile("its token ids are not valid for this model")
            blocks, rings, key = meta.get("blocks"), meta.get("rings"), meta.get("key")
            if not isinstance(blocks, list) or not all(isinstance(b, str) and b.isalnum() for b in blocks):
                raise DamagedFile("its block list is malformed")
            if not isinstance(rings, dict) or not isinstance(key, str) or path.name != f"pfx-{key}.safetensors":
                raise DamagedFile("its key or ring list is malformed")
            ring_pos = {int(i): (int(r[0]), int(r[1])) for i, r in rings.items()}
            toks = np.asarray(tokens, np.int32)
            max_back = self.check_index(key, toks, blocks, ring_pos)
            return DiskEntry(key, toks, blocks, max_back, ring_pos, path, st.st_size, st.st_mtime)
        except FileNotFoundError:
            return None
        except (SafetensorsError, DamagedFile, KeyError, TypeError, ValueError) as e:
            self._discard(path, str(e))
            return None

    def _meta(self, metadata: dict, path: Path) -> dict:
        try:
            meta = json.loads(metadata[META_KEY])
        except (KeyError, TypeError, ValueError):
            raise DamagedFile("it is not a step35-mlx prefix-cache file") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise DamagedFile(f"it is not a step35-mlx prefix-cache file (version {VERSION})")
        if meta.get("cache") != self.cache_key:
            raise DamagedFile("it was written for another model or KV format")
        return meta

    def _discard(self, path: Path, why: str) -> None:
        self.warn(f"warning: prefix cache: removing {path.name} ({why})")
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ read

    def load_arrays(self, path: Path, kind: str, check: Callable[[dict], None]) -> tuple[dict, dict[str, mx.array]]:
        """Metadata and arrays of a file, checked whole (``check`` validates shapes); ``DamagedFile`` if not usable."""
        try:
            header = SafetensorsFile(path)
            meta = self._meta(header.metadata, path)
            if meta.get("kind") != kind:
                raise DamagedFile(f"it is not a {kind} file")
            arrays = mx.load(str(path), format="safetensors")
            check(arrays)
            mx.eval(list(arrays.values()))
        except FileNotFoundError:
            raise
        except DamagedFile as e:
            self._discard(path, str(e))
            raise
        except Exception as e:  # noqa: BLE001 - any parse/read failure means a damaged file
            self._discard(path, f"{type(e).__name__}: {e}")
            raise DamagedFile(str(e)) from None
        return meta, arrays

    def touch(self, key: str) -> None:
        e = self.entries.get(key)
        if e is None:
            return
        e.used = time.time()
        try:
            os.utime(e.path, (e.used, e.used))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ write

    def write(self, key: str, tokens: np.ndarray, blocks: list[str], max_back: int,
              rings: dict[int, tuple[int, int]], arrays: dict[str, mx.array],
              block_arrays: Callable[[str], dict[str, mx.array]]) -> None:
        """Write the entry's missing blocks, then the entry; evict least recently used entries past the budget."""
        own = sum(a.nbytes for a in arrays.values())
        new_blocks = [h for h in dict.fromkeys(blocks) if h not in self.block_sizes]
        need = own + sum(sum(a.nbytes for a in block_arrays(h).values()) for h in new_blocks)
        if need > self.budget:
            return
        self._evict(need, keep=set(blocks))
        base = {"format": FORMAT, "version": VERSION, "cache": self.cache_key}
        for h in new_blocks:
            path = self.block_path(h)
            write_session_file(path, block_arrays(h), {**base, "kind": "block", "key": h}, meta_key=META_KEY)
            self.block_sizes[h] = path.stat().st_size
        meta = {**base, "kind": "entry", "key": key, "tokens": tokens.tolist(), "blocks": blocks,
                "rings": {str(i): list(r) for i, r in rings.items()}}
        path = self.entry_path(key)
        write_session_file(path, arrays, meta, meta_key=META_KEY)
        self.entries[key] = DiskEntry(key, tokens, list(blocks), max_back, dict(rings), path, path.stat().st_size)

    def _evict(self, incoming: int, keep: set[str]) -> None:
        while self.entries and self.nbytes + incoming > self.budget:
            oldest = min(self.entries.values(), key=lambda e: e.used)
            self.remove(oldest.key, keep)

    def remove(self, key: str, keep: set[str] = frozenset()) -> None:
        e = self.entries.pop(key, None)
        if e is None:
            return
        try:
            e.path.unlink()
        except FileNotFoundError:
            pass
        used = {h for other in self.entries.values() for h in other.blocks} | keep
        for h in [h for h in self.block_sizes if h not in used]:
            try:
                self.block_path(h).unlink()
            except FileNotFoundError:
                pass
            del self.block_sizes[h]

