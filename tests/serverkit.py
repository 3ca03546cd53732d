"""A live server on a free loopback port for the HTTP tests (uvicorn in a thread, stopped and closed after),
the demo model served that way, and SDK clients for it."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import uvicorn

from clirun import free_port


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` (from ``step35_mlx.server.create_app``) and yield its base URL; close its engine after."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(10)
        app.state.engine.close()


@contextmanager
def demo_server(api_key: str, **options: Any) -> Iterator[dict]:
    """The bundled demo model served live as ``step-demo``: ``{"url", "app", "tok", "model"}``.

    ``options`` go to ``create_app`` (``max_queue``, ``max_context``...).
    """
    from step35_mlx.loader import load
    from step35_mlx.server import create_app

    model, tok = load("demo")
    app = create_app(model, tok, model_name="step-demo", api_key=api_key, **options)
    with live_server(app) as url:
        yield {"url": url, "app": app, "tok": tok, "model": model}


def openai_client(url: str, api_key: str) -> Any:
    """An OpenAI SDK client for the server at ``url``: no retries, 60 s timeout."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def anthropic_client(url: str, api_key: str) -> Any:
    """An Anthropic SDK client for the server at ``url``: no retries, 60 s timeout."""
    import anthropic

    return anthropic.Anthropic(base_url=url, api_key=api_key, max_retries=0, timeout=60)
