"""Minimal streaming safetensors reader and writer.

The converter never holds a whole checkpoint (or a whole output shard) in memory:

* :class:`SafetensorsFile` parses only the JSON header and reads byte ranges of a
  tensor on demand (row slices of axis 0), so a 3 GB fused-expert tensor can be
  quantized a few experts at a time.
* :class:`ShardWriter` writes a shard whose layout (names, dtypes, shapes, offsets)
  was planned up front: the header goes first, tensor bytes are written at their
  planned offsets as they are produced, and the file appears under its final name
  only after it is complete (``NAME.tmp`` + ``fsync`` + ``os.replace``); its sha256 is
  computed while it is written.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
(padded with spaces to a multiple of 8), then the tensor bytes; offsets are
relative to the end of the header and tile the data region without gaps.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# safetensors dtype string -> (itemsize in bytes, numpy dtype used to hold the raw bits)
DTYPES: dict[str, tuple[int, Any]] = {
    "BOOL": (1, np.uint8),
    "U8": (1, np.uint8),
    "I8": (1, np.int8),
    "F8_E4M3": (1, np.uint8),
    "F8_E5M2": (1, np.uint8),
    "I16": (2, np.int16),
    "U16": (2, np.uint16),
    "F16": (2, np.float16),
    "BF16": (2, np.uint16),
    "I32": (4, np.int32),
    "U32": (4, np.uint32),
    "F32": (4, np.float32),
    "I64": (8, np.int64),
    "U64": (8, np.uint64),
    "F64": (8, np.float64),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt, or not what its index says."""


def itemsize(dtype: str) -> int:
    try:
        return DTYPES[dtype][0]
    except KeyError:
        raise SafetensorsError(f"unknown safetensors dtype {dtype!r}") from None


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = itemsize(dtype)
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along axis 0 (the whole tensor for 0-d / 1-d tensors)."""
        if len(self.shape) <= 1:
            return self.nbytes
        return nbytes(self.dtype, self.shape[1:])


class SafetensorsFile:
    """Header of one ``.safetensors`` file plus ranged reads. Raises ``SafetensorsError`` when damaged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise SafetensorsError(f"shard {self.path.name} does not exist in {self.path.parent}") from None
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"shard {self.path.name} is truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    f"shard {self.path.name} is truncated or corrupt (header length {n}, file {size} bytes)"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"shard {self.path.name} has a corrupt header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"shard {self.path.name} has a corrupt header (not a JSON object)")
        self.header_bytes = 8 + n
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.size = size
        tensors: dict[str, TensorInfo] = {}
        data_end = 0
        for name, meta in header.items():
            try:
                dtype = meta["dtype"]
                shape = tuple(int(d) for d in meta["shape"])
                b, e = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"shard {self.path.name}: corrupt header entry for {name!r}") from None
            if e < b or e - b != nbytes(dtype, shape):
                raise SafetensorsError(
                    f"shard {self.path.name}: tensor {name} has offsets [{b}, {e}) that do not match "
                    f"its dtype {dtype} and shape {list(shape)}"
                )
            tensors[name] = TensorInfo(name, dtype, shape, self.header_bytes + b, self.header_bytes + e)
            data_end = max(data_end, e)
        self.data_size = data_end
        if self.header_bytes + data_end > size:
            raise SafetensorsError(
                f"shard {self.path.name} is truncated: its header needs {self.header_bytes + data_end} bytes, "
                f"the file has {size}; re-download or re-convert it"
            )
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read_bytes(self, info: TensorInfo, start: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes of a tensor starting ``start`` bytes into it (all of it by default)."""
        if length is None:
            length = info.nbytes - start
        with open(self.path, "rb") as f:
            f.seek(info.begin + start)
            data = f.read(length)
        if len(data) != length:
            raise SafetensorsError(f"shard {self.path.name}: short read of tensor {info.name} (file truncated?)")
        return data

    def read_rows(self, info: TensorInfo, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of axis 0 as a NumPy array holding the raw bits (bf16 -> uint16, fp8 -> uint8)."""
        np_dtype = DTYPES[info.dtype][1]
        if len(info.shape) == 0:
            data = self.read_bytes(info)
            return np.frombuffer(data, dtype=np_dtype).reshape(())
        rb = info.row_bytes
        data = self.read_bytes(info, r0 * rb, (r1 - r0) * rb)
        return np.frombuffer(data, dtype=np_dtype).reshape((r1 - r0,) + tuple(info.shape[1:]))


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) for tensors laid out back to back in ``entries`` order.

    Returns the header and each tensor's data offset relative to the start of the data region.
    Deterministic: the same entries give the same bytes.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        n = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either absent/old or complete: ``.tmp`` + fsync + rename.

    On failure (disk full, read-only file system, ...) the ``.tmp`` is removed and the ``OSError`` raised.
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


HASH_CHUNK = 8 * 2**20


class ShardWriter:
    """Writes one planned shard to ``NAME.tmp``; :meth:`commit` renames it to ``NAME``.

    The sha256 of the whole file is computed while writing (:attr:`sha256` after ``commit``):
    bytes written at the hash position are hashed at once; bytes written ahead of it (a
    quantized tensor's scales and biases, produced alongside its packed weight) are kept in
    memory up to ``max_pending`` bytes and hashed when the position reaches them. Only what
    exceeds that budget, never written regions or overlapping rewrites are read back from
    the file, so a shard written in planned order is never re-read
    (:attr:`reread_bytes` counts what was).
    """

    def __init__(self, path: Path, header: bytes, data_size: int, *, max_pending: int = 256 * 2**20):
        self.path = Path(path)
        self.tmp = tmp_path(self.path)
        self.header_len = len(header)
        self.total = len(header) + data_size
        self.sha256: str | None = None
        self.reread_bytes = 0
        self._sha = hashlib.sha256(header)
        self._hashed = len(header)  # file offset up to which bytes are hashed
        self._pending: dict[int, tuple[int, bytes | None]] = {}  # file offset -> (length, bytes or None)
        self._pending_bytes = 0
        self._max_pending = max_pending
        self._rehash = False
        self._f = open(self.tmp, "w+b")
        try:
            self._f.write(header)
            self._f.truncate(self.total)
        except BaseException:
            self.abort()
            raise

    def write_at(self, data_offset: int, data) -> None:
        """Write ``data`` (bytes or a C-contiguous NumPy array) at ``data_offset`` in the data region."""
        pos = self.header_len + data_offset
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
        view = memoryview(data).cast("B")
        self._f.seek(pos)
        self._f.write(view)
        self._track(pos, view)

    def _track(self, pos: int, view: memoryview) -> None:
        n = len(view)
        if pos == self._hashed:
            self._sha.update(view)
            self._hashed += n
            self._drain()
        elif pos < self._hashed or pos in self._pending:
            self._rehash = True  # an overwrite: hash the finished file instead
        elif self._pending_bytes + n <= self._max_pending:
            self._pending[pos] = (n, bytes(view))
            self._pending_bytes += n
        else:
            self._pending[pos] = (n, None)

    def _drain(self) -> None:
        while self._hashed in self._pending:
            n, data = self._pending.pop(self._hashed)
            if data is None:
                self._hash_from_file(self._hashed, self._hashed + n)
            else:
                self._pending_bytes -= n
                self._sha.update(data)
                self._hashed += n

    def _hash_from_file(self, start: int, end: int) -> None:
        self._f.flush()
        fd = self._f.fileno()
        pos = start
        while pos < end:
            chunk = os.pread(fd, min(HASH_CHUNK, end - pos), pos)
            if not chunk:
                raise SafetensorsError(f"{self.tmp}: short read at byte {pos} while hashing")
            self._sha.update(chunk)
            pos += len(chunk)
        self.reread_bytes += end - start
        self._hashed = end

    def commit(self) -> str:
        """fsync, finish the checksum, rename ``NAME.tmp`` to ``NAME``; returns the sha256 (hex)."""
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._rehash or any(p < self._hashed for p in self._pending):
            self._sha, self._hashed = hashlib.sha256(), 0
        self._pending.clear()
        self._hash_from_file(self._hashed, self.total)
        self._f.close()
        if self.tmp.stat().st_size != self.total:
            raise SafetensorsError(f"{self.tmp} has {self.tmp.stat().st_size} bytes, expected {self.total}")
        self.sha256 = self._sha.hexdigest()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.sha256

    def abort(self) -> None:
        """Close without renaming and remove the ``.tmp`` (nothing half-written stays behind)."""
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:
                pass  # a failed flush of a shard that is being discarded anyway
        self.tmp.unlink(missing_ok=True)
