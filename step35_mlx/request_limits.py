"""Bounds on what an HTTP request may send: body size (413 before it is read whole) and JSON shape."""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_BODY_BYTES = 8 * 10**6
MAX_JSON_DEPTH = 64  # tool schemas nest a few levels; nothing a client sends needs more


class RequestRejected(Exception):
    """A request refused before it reaches the model: ``status`` and a message meant for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _too_large(size: str, limit: int) -> RequestRejected:
    return RequestRejected(413, f"the request body is {size} bytes; this server accepts at most {limit:,} "
                                "(start it with a larger --max-body)")


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a Starlette ``request``, refused with 413 as soon as it passes ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before any byte is read; a chunked
    body is counted as it arrives, so at most ``limit`` bytes are ever held.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestRejected(400, "the Content-Length header is not a number")
        if int(declared) > limit:
            raise _too_large(f"{int(declared):,}", limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(f"more than {limit:,}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a request body: UTF-8 JSON without NaN/Infinity, nested at most ``max_depth`` levels (else 400)."""
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestRejected(400, f"the request body is nested more than {max_depth} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RequestRejected(400, f"the request body is not valid JSON ({e})") from None
    if json_depth(data) > max_depth:
        raise RequestRejected(400, f"the request body is nested more than {max_depth} levels deep")
    return data
