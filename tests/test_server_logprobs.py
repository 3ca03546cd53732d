"""Log-probabilities on the server (issue 13, item 4): ``/v1/completions`` with ``echo``, ``logprobs``,
token-id prompts and prompt lists, and chat ``logprobs``/``top_logprobs``, against the model's own
log-softmax computed in-process in float64."""

from __future__ import annotations


try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from step35_mlx import logprobs as logprobs_mod  # noqa: E402
from step35_mlx.generate import encode_prompt, stream_generate  # noqa: E402
from serverkit import demo_server, openai_client  # noqa: E402

KEY = "k"
H = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    with demo_server(KEY, max_context=1024) as s:
        yield s


@pytest.fixture
def oa(server):
    return openai_client(server["url"], KEY)


def _reference(model, ids) -> np.ndarray:
    """log_softmax of the model's logits for every position of ``ids``, in float64 (row i predicts ids[i+1])."""
    logits = np.asarray(model(mx.array(ids)[None])[0].astype(mx.float32), dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_score_in_chunks_equals_one_forward(server, monkeypatch):
    model, tok = server["model"], server["tok"]
    ids = encode_prompt(tok, "The capital of France is Paris. " * 4)
    monkeypatch.setattr(logprobs_mod, "CHUNK", 5)  # several chunks through the cache
    got = logprobs_mod.score(model, ids, top=3, start=1)
    ref = _reference(model, ids)
    assert got.logprobs[0] is None
    assert max(abs(got.logprobs[i] - ref[i - 1, ids[i]]) for i in range(1, len(ids))) <= 1e-4
    for i in range(1, len(ids)):
        assert [t for t, _ in got.top[i]] == list(np.argsort(-ref[i - 1])[:3])


def test_lm_eval_loglikelihood_request(server):
    """lm-eval's local-completions loglikelihood body: token-id prompts (context + continuation),
    echo, max_tokens 1, logprobs 1; it sums token_logprobs[ctxlen:-1] and checks greediness."""
    model, tok = server["model"], server["tok"]
    ctx = encode_prompt(tok, "Question: What is the capital of France?\nAnswer:")
    conts = [tok.encode(" Paris", add_special_tokens=False), tok.encode(" a small dog", add_special_tokens=False)]
    body = {"model": "step-demo", "prompt": [ctx + c for c in conts], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(server["url"] + "/v1/completions", json=body, headers=H, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for choice, cont in zip(choices, conts):
        ids = ctx + cont
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        ref = _reference(model, ids)
        want = sum(ref[len(ctx) - 1 + k, t] for k, t in enumerate(cont))
        assert abs(sum(lp["token_logprobs"][len(ctx):-1]) - want) <= 1e-4
        greedy = all(int(np.argmax(ref[len(ctx) - 1 + k])) == t for k, t in enumerate(cont))
        is_greedy = all(t == max(top.values()) for t, top in
                        zip(lp["token_logprobs"][len(ctx):-1], lp["top_logprobs"][len(ctx):-1]))
        assert is_greedy == greedy
        assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=False))
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_lm_eval_text_loglikelihood_request(server):
    """lm-eval's ``tokenized_requests=False`` body: the text of context + continuation; it counts ctxlen
    with the tokenizer's own ids (no bos), so the echo must start after the bos the server adds."""
    model, tok = server["model"], server["tok"]
    context, conts = "Question: What is the capital of France?\nAnswer:", [" Paris", " a small dog"]
    ctxlen = len(tok.encode(context, add_special_tokens=False))
    body = {"model": "step-demo", "prompt": [context + c for c in conts], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(server["url"] + "/v1/completions", json=body, headers=H, timeout=60)
    assert r.status_code == 200, r.text
    for choice, cont in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), conts):
        ids = encode_prompt(tok, context + cont)
        assert ids[0] == tok.bos_token_id
        ref = _reference(model, ids)
        want = sum(ref[k, ids[k + 1]] for k in range(ctxlen, len(ids) - 1))  # the continuation, given bos + context
        assert abs(sum(choice["logprobs"]["token_logprobs"][ctxlen:-1]) - want) <= 1e-4


def test_completions_logprobs_of_generated_tokens(server, oa):
    model, tok = server["model"], server["tok"]
    prompt = "The capital of France is"
    r = oa.completions.create(model="m", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ids = encode_prompt(tok, prompt)
    gen = [c.token_ids[0] for c in stream_generate(model, tok, prompt, max_tokens=5, temperature=0)]
    assert len(lp.token_logprobs) == 5 and lp.text_offset[0] == len(prompt)
    ref = _reference(model, ids + gen)
    for k, t in enumerate(gen):
        assert abs(lp.token_logprobs[k] - ref[len(ids) - 1 + k, t]) <= 1e-4
        assert lp.token_logprobs[k] == max(lp.top_logprobs[k].values())  # greedy: the chosen token is the top one
        assert len(lp.top_logprobs[k]) <= 2
    assert "".join(lp.tokens).lstrip() == r.choices[0].text.lstrip()  # the detokenizer drops a leading space


def test_prompt_only_scoring_and_prompt_lists(server, oa):
    model, tok = server["model"], server["tok"]
    r = oa.completions.create(model="m", prompt=["one two", "three"], max_tokens=0, echo=True, logprobs=0)
    assert [c.text for c in r.choices] == ["one two", "three"]
    assert r.usage.completion_tokens == 0
    for c in r.choices:
        # the bos the server puts before a text prompt is context, not echoed text: tokens and
        # offsets cover the text, and its first token is scored given the bos
        lp, ids = c.logprobs, encode_prompt(tok, c.text)
        assert ids[0] == tok.bos_token_id and "".join(lp.tokens) == c.text
        assert [c.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
        ref = _reference(model, ids)
        assert max(abs(v - ref[k, ids[k + 1]]) for k, v in enumerate(lp.token_logprobs)) <= 1e-4
    r = oa.completions.create(model="m", prompt=[[1, 2, 3], tok.decode([tok.bos_token_id]) + "one"], max_tokens=0,
                              echo=True, logprobs=0)
    assert [c.logprobs.token_logprobs[0] for c in r.choices] == [None, None]  # a prompt's own first token
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        oa.completions.create(model="m", prompt=[[1, 10**9]], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="stream"):
        oa.completions.create(model="m", prompt="x", max_tokens=1, echo=True, stream=True)


def test_chat_logprobs(server, oa):
    model, tok = server["model"], server["tok"]
    msgs = [{"role": "user", "content": "hi"}]
    r = oa.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                   top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True))
    gen = [c.token_ids[0] for c in stream_generate(model, tok, msgs, max_tokens=6, temperature=0)]
    ref = _reference(model, ids + gen)
    for k, e in enumerate(content):
        assert abs(e.logprob - ref[len(ids) - 1 + k, gen[k]]) <= 1e-4
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob
    stream = oa.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                        stream=True)
    last = [c for c in stream if c.choices and c.choices[0].logprobs][-1]
    assert [e.logprob for e in last.choices[0].logprobs.content] == [e.logprob for e in content]
    plain = oa.chat.completions.create(model="m", messages=msgs, max_tokens=2)
    assert plain.choices[0].logprobs is None
