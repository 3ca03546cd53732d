"""Byte and token units, and the command line's parsers for contexts and KV formats."""

from __future__ import annotations

import re

GB = 10**9
GiB = 1 << 30
MiB = 1 << 20


def parse_tokens(text: str) -> int:
    """``32768``, ``32K``, ``256k``, ``1M`` -> tokens (K = 1024)."""
    t = str(text).strip().replace(",", "").replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmM]?)", t)
    if not m:
        raise ValueError(f"cannot read context {text!r}; use a number of tokens like 32768 or 32K")
    mult = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def format_tokens(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    if n >= 1024:
        return f"{n / 1024:.1f}K"
    return str(n)


def parse_kv_bits(text: str | int | None) -> int | None:
    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("none", "off", "16", "bf16", "float", ""):
        return None
    if t in ("8", "4"):
        return int(t)
    raise ValueError(f"--kv-bits must be none, 8 or 4, got {text!r}")
