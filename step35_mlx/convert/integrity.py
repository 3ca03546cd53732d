"""Shard checksums and plain-language messages for file-system failures while writing.

The converter records the sha256 of every shard it writes in the index, under
``metadata.step35_mlx_sha256`` (``{shard file name: hex digest}``); the digest is of the
whole file, so ``shasum -a 256 SHARD`` reproduces it. ``verify --deep`` and a resumed
conversion recompute it with :func:`file_sha256`.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import Callable

CHECKSUM_KEY = "step35_mlx_sha256"
_CHUNK = 8 * 2**20


def file_sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in 8 MiB pieces; ``on_bytes(n)`` after each piece."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def recorded_checksums(index: dict) -> dict[str, str] | None:
    """``{shard: sha256}`` from a parsed index, or ``None`` when none are recorded (or malformed)."""
    meta = index.get("metadata") if isinstance(index, dict) else None
    sums = meta.get(CHECKSUM_KEY) if isinstance(meta, dict) else None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        return None
    return dict(sums)


def write_failure(e: OSError, out: Path, where: str | None = None) -> str:
    """One line saying why writing the conversion into ``out`` failed and what to do."""
    place = f" while writing {where}" if where else ""
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return (f"the disk holding {out} is full{place}; free some space and rerun the same command "
                "to resume from the last complete shard")
    if e.errno == errno.EROFS:
        return f"{out} is on a read-only file system; choose another --out"
    if e.errno in (errno.EACCES, errno.EPERM):
        target = e.filename or out
        return f"permission denied writing {target}; choose another --out or make it writable"
    detail = e.strerror or str(e)
    return f"cannot write the conversion into {out}{place}: {detail}" + (f" ({e.filename})" if e.filename else "")
