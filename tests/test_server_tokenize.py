"""vLLM's tokenizer endpoints on the server (``/tokenizer_info``, ``/tokenize``, ``/detokenize``): what
lm-eval's ``local-completions`` uses to count tokens without a copy of the model folder."""

from __future__ import annotations

import json

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")

from step35_mlx.generate import encode_prompt  # noqa: E402
from serverkit import demo_server  # noqa: E402

KEY = "k"
H = {"authorization": f"Bearer {KEY}"}
TEXT = "Question: What does len() return?\nAnswer: the number of items"


@pytest.fixture(scope="module")
def server():
    with demo_server(KEY, max_context=1024) as s:
        yield s


def test_tokenize_detokenize_and_info(server):
    url, tok = server["url"], server["tok"]
    info = httpx.get(url + "/tokenizer_info", headers=H).json()
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<|begin_of_sentence|>", "<|im_end|>",
                                                                                1024)
    assert info["chat_template"] == tok.chat_template
    own = httpx.post(url + "/tokenize", json={"prompt": TEXT, "add_special_tokens": False}, headers=H).json()
    assert own["tokens"] == tok.encode(TEXT, add_special_tokens=False) and own["count"] == len(own["tokens"])
    served = httpx.post(url + "/tokenize", json={"model": "step-demo", "prompt": TEXT}, headers=H).json()
    assert served["tokens"] == encode_prompt(tok, TEXT) == [tok.bos_token_id] + own["tokens"]
    assert served["max_model_len"] == 1024
    back = httpx.post(url + "/detokenize", json={"tokens": served["tokens"]}, headers=H).json()
    assert back == {"prompt": info["bos_token"] + TEXT}


@pytest.mark.parametrize("path,body,param", [
    ("/detokenize", {"tokens": [1, 2048]}, "tokens"),
    ("/detokenize", {"tokens": []}, "tokens"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),  # a lone surrogate (JSON-escaped: not UTF-8)
    ("/tokenize", {"prompt": 3}, "prompt"),
])
def test_bad_requests_are_400(server, path, body, param):
    r = httpx.post(server["url"] + path, content=json.dumps(body), headers={**H, "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_key_required(server):
    assert httpx.get(server["url"] + "/tokenizer_info").status_code == 401
    assert httpx.post(server["url"] + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.post(server["url"] + "/detokenize", json={"tokens": [5]}).status_code == 401
