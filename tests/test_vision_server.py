"""Images through the HTTP server with the official openai and anthropic clients (loopback only)."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from contextlib import ExitStack

import mlx.core as mx
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
uvicorn = pytest.importorskip("uvicorn")

from step35_mlx.loader import load  # noqa: E402
from step35_mlx.server import create_app  # noqa: E402
from serverkit import anthropic_client, live_server, openai_client  # noqa: E402
from step35_mlx.server.images import ImagePolicy  # noqa: E402
from step35_mlx.vision.synthetic import (  # noqa: E402
    sample_image, step3p7_config, tiny_vision_config, write_step3p7_checkpoint, write_vision_tokenizer,
)

GLOBAL = 49  # image tokens of a 728 view at patch 28


def _png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    sample_image(w, h, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm_srv")
    ids = write_vision_tokenizer(path)
    cfg = step3p7_config(tiny_vision_config(width=16, layers=1, patch_size=28), image_token_id=ids["<im_patch>"],
                         vocab_size=2056, num_mtp=0, num_layers=2)
    write_step3p7_checkpoint(path, cfg, seed=1)
    model, tok = load(path, dtype=mx.float32)
    demo, demo_tok = load("demo")
    png = _png(160, 120, seed=3)
    (path / "photo.png").write_bytes(png)

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = png if self.path == "/photo.png" else b"not an image"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    apps = {
        "open": create_app(model, tok, images=ImagePolicy(enabled=True, allow_local=True, allow_remote=True,
                                                          max_images=2)),
        "strict": create_app(model, tok),
        "text": create_app(demo, demo_tok),
    }
    with ExitStack() as stack:
        urls = {k: stack.enter_context(live_server(a)) for k, a in apps.items()}
        yield {"urls": urls, "path": path, "png": png, "tok": tok,
               "files": f"http://127.0.0.1:{files.server_address[1]}"}
        files.shutdown()


def _oa(servers, name):
    return openai_client(servers["urls"][name], "x")


def _an(servers, name):
    return anthropic_client(servers["urls"][name], "x")


def _template_len(tok, n_images: int) -> int:
    msgs = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": "What is it?"}]}]
    return len(tok.apply_chat_template(msgs, add_generation_prompt=True))


def _oai_image(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]


def test_openai_client_sends_a_data_url(servers):
    data = "data:image/png;base64," + base64.b64encode(servers["png"]).decode()
    r = _oa(servers, "strict").chat.completions.create(
        model="m", messages=[{"role": "user", "content": _oai_image(data)}], max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == _template_len(servers["tok"], 1) - 1 + GLOBAL + 2
    assert r.usage.completion_tokens == 2


def test_anthropic_client_sends_a_base64_block_and_counts_it(servers):
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(servers["png"]).decode()}}
    msgs = [{"role": "user", "content": [block, {"type": "text", "text": "What is it?"}]}]
    client = _an(servers, "strict")
    r = client.messages.create(model="m", max_tokens=2, messages=msgs)
    expected = _template_len(servers["tok"], 1) - 1 + GLOBAL + 2
    # Anthropic usage: input_tokens are the uncached part (the OpenAI test sent the same picture before)
    assert r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0) == expected
    assert client.messages.count_tokens(model="m", messages=msgs).input_tokens == expected


def test_local_and_remote_sources_need_their_flags(servers):
    local = str(servers["path"] / "photo.png")
    remote = servers["files"] + "/photo.png"
    for url in (local, "file://" + local, remote):
        r = _oa(servers, "open").chat.completions.create(
            model="m", messages=[{"role": "user", "content": _oai_image(url)}], max_tokens=1)
        assert r.usage.prompt_tokens == _template_len(servers["tok"], 1) - 1 + GLOBAL + 2
    for url, flag in ((local, "--allow-local-images"), (remote, "--allow-remote-images")):
        with pytest.raises(openai.BadRequestError, match=flag):
            _oa(servers, "strict").chat.completions.create(
                model="m", messages=[{"role": "user", "content": _oai_image(url)}], max_tokens=1)


@pytest.mark.parametrize("content,expected", [
    (_oai_image("data:image/png;base64,@@@"), "not valid base64"),
    (_oai_image("data:image/png;base64," + base64.b64encode(b"hello").decode()), "not a readable image"),
    (_oai_image("ftp://example.invalid/x.png"), "unsupported image URL"),
    (_oai_image("REMOTE/text.txt"), "not a readable image"),
    (_oai_image("PNG") + _oai_image("PNG") + _oai_image("PNG"), "more than 2 images"),
])
def test_bad_images_are_400(servers, content, expected):
    png = "data:image/png;base64," + base64.b64encode(servers["png"]).decode()
    for part in content:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            part["image_url"]["url"] = png if url == "PNG" else url.replace("REMOTE", servers["files"])
    with pytest.raises(openai.BadRequestError, match=expected):
        _oa(servers, "open").chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                     max_tokens=1)


def test_text_model_refuses_images(servers):
    data = "data:image/png;base64," + base64.b64encode(servers["png"]).decode()
    with pytest.raises(openai.BadRequestError, match="no vision tower"):
        _oa(servers, "text").chat.completions.create(
            model="m", messages=[{"role": "user", "content": _oai_image(data)}], max_tokens=1)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(servers["png"]).decode()}}
    with pytest.raises(anthropic.BadRequestError, match="no vision tower"):
        _an(servers, "text").messages.create(model="m", max_tokens=1,
                                             messages=[{"role": "user", "content": [block]}])
