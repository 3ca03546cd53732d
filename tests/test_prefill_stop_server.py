"""A client that disconnects during a long prefill frees ``serve``'s worker (issue 13).

An 8K-token prompt on the long-context checkpoint, prefilled 64 tokens a chunk (about 3 s here):
the streaming request's connection is closed once the engine's prefill counter shows the prefill
under way; the worker must then be free after a small part of the prompt's chunks, in a fraction
of the full prefill's time, and the same conversation sent again must answer as in-process greedy
decoding does (the stopped turn left the session and the prefix cache consistent).
"""

from __future__ import annotations

import json
import math
import socket
import time
from urllib.parse import urlparse

import mlx.core as mx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from longkit import long_model_dir, long_text  # noqa: E402
from serverkit import live_server  # noqa: E402
from step35_mlx import load, stream_generate  # noqa: E402
from step35_mlx.prefix_cache import PrefixCache  # noqa: E402
from step35_mlx.server import create_app  # noqa: E402

KEY = "k"
STEP = 64
REPLY = 4


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _open_stream(url: str, body: dict) -> socket.socket:
    """Send a streaming chat request on a raw connection (closing it is the client going away)."""
    u = urlparse(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (u.netloc.encode(), KEY.encode(), len(data)) + data)
    return sock


def test_disconnect_during_prefill_frees_the_worker():
    model, tok = load(long_model_dir(), dtype=mx.float32)
    messages = [{"role": "system", "content": long_text(tok, 8000, 13)},
                {"role": "user", "content": long_text(tok, 100, 14)}]
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True))
    chunks = list(stream_generate(model, tok, messages, max_tokens=REPLY, temperature=0, prefill_step=STEP))
    want = ("".join(c.reasoning for c in chunks), "".join(c.content for c in chunks))
    full_s = chunks[-1].stats.prefill_tokens / chunks[-1].stats.prompt_tps  # the whole prompt's prefill
    needed = math.ceil(len(ids) / STEP)

    app = create_app(model, tok, model_name="long", api_key=KEY, prefill_step=STEP,
                     prefix_cache=PrefixCache(model, ram_bytes=2 * 10**9))
    engine = app.state.engine
    with live_server(app) as url:
        sock = _open_stream(url, {"model": "long", "messages": messages, "max_tokens": REPLY, "temperature": 0,
                                  "stream": True})
        _wait(lambda: engine.prefill_checks >= 5, "the prefill to start")
        sock.close()
        closed = time.monotonic()
        _wait(lambda: engine.inflight == 0, "the worker to stop")
        freed = time.monotonic() - closed
        ran = engine.prefill_checks
        assert ran < needed // 2, (ran, needed)
        assert freed < full_s / 2, (freed, full_s)

        oa = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        r = oa.chat.completions.create(model="long", messages=messages, max_tokens=REPLY, temperature=0)
        msg = r.choices[0].message
        assert ((msg.model_extra.get("reasoning_content") or ""), msg.content) == want
        assert r.usage.prompt_tokens == len(ids)
        # the stopped turn's whole chunks were kept (head of the system prompt + chunks after it)
        assert 0 < r.usage.prompt_tokens_details.cached_tokens < len(ids) // 2
        assert engine.prefill_checks - ran < needed
