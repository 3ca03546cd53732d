"""Byte budgets for the tiers: ``8GB``-style sizes."""

from __future__ import annotations


def parse_budget(text: str | int | None, what: str) -> int:
    """``"8GB"`` / ``"512MiB"`` / ``"0"`` or ``"off"`` / an int -> bytes (0 turns a tier off); ``ValueError`` naming ``what``."""
    from ..convert.quantize import parse_size

    if text is None:
        return 0
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif str(text).strip().lower() in ("0", "0b", "off"):
        value = 0
    else:
        try:
            value = parse_size(str(text))
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {text!r}")
    return int(value)

