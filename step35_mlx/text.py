"""Checks on text that reaches the tokenizer: it must be valid Unicode that UTF-8 can encode."""

from __future__ import annotations


def invalid_text_reason(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (a lone surrogate, e.g. from undecodable bytes), or ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # how surrogateescape carries a byte that is not UTF-8
            return f"it is not valid UTF-8 (byte 0x{ord(ch) - 0xDC00:02x} at character {e.start})"
        return f"it holds a lone surrogate U+{ord(ch):04X} at character {e.start}, which is not valid Unicode text"
    return None


def check_text(text: str, what: str = "the prompt") -> None:
    """Raise ``ValueError`` naming ``what`` when ``text`` is not valid Unicode text."""
    reason = invalid_text_reason(text)
    if reason is not None:
        raise ValueError(f"{what} cannot be used: {reason}")
