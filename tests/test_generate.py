"""stream_generate / generate on a tiny random checkpoint with a real chat template and tokenizer."""

import json
from types import SimpleNamespace

import mlx.core as mx
import pytest

from chatkit import chat_model
from step35_mlx.generate import (
    FALLBACK_SETTINGS,
    ar_tokens,
    encode_prompt,
    generate,
    model_generation_config,
    read_generation_config,
    resolve_settings,
    stream_generate,
)
from step35_mlx.reasoning import split_reasoning
from step35_mlx.sampling import SamplingParams

MSGS = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello! How are you?"}]


@pytest.fixture(scope="module")
def mt():
    return chat_model()


def greedy_reference(model, ids, n):
    """Recompute the whole sequence every step (no cache)."""
    seq = list(ids)
    for _ in range(n):
        logits = model(mx.array([seq]))
        seq.append(int(mx.argmax(logits[0, -1]).item()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def reference(mt):
    model, tok = mt
    ids = encode_prompt(tok, MSGS)
    return ids, greedy_reference(model, ids, 40)


def test_chat_prompt_uses_the_checkpoint_template(mt):
    _, tok = mt
    text = tok.decode(encode_prompt(tok, MSGS))
    assert text == ("<|begin_of_sentence|><|im_start|>system\nYou are helpful.<|im_end|>\n"
                    "<|im_start|>user\nHello! How are you?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    with_tools = tok.decode(encode_prompt(tok, MSGS, tools))
    assert "# Tools" in with_tools and '"name": "get_weather"' in with_tools
    # raw text: bos prepended once
    ids = encode_prompt(tok, "Hello")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert encode_prompt(tok, tok.bos_token + "Hello") == ids


@pytest.mark.parametrize("prefill_step", [512, 5])
def test_streaming_greedy_equals_full_recompute(mt, reference, prefill_step):
    model, tok = mt
    ids, ref = reference
    assert len(ids) + len(ref) > 3 * model.config.sliding_window  # decoding runs well past the window
    chunks = list(stream_generate(model, tok, MSGS, max_tokens=40, temperature=0, prefill_step=prefill_step))
    assert [c.token_ids[0] for c in chunks] == ref
    assert all(len(c.token_ids) == 1 for c in chunks)
    assert [c.finish_reason for c in chunks] == [None] * 39 + ["length"]
    st = chunks[-1].stats
    assert (st.prompt_tokens, st.prefill_tokens, st.generation_tokens) == (len(ids), len(ids), 40)
    assert st.context_tokens == len(ids) + 40 and st.context_limit == model.config.max_position_embeddings
    assert st.prompt_tps > 0 and st.generation_tps > 0 and st.peak_memory_gb > 0
    # the chunks' text is the streamed decode; reasoning/content split it like the one-shot splitter
    text = "".join(c.text for c in chunks)
    assert text == generate(model, tok, MSGS, max_tokens=40, temperature=0)
    assert ("".join(c.reasoning for c in chunks), "".join(c.content for c in chunks)) == split_reasoning(text)


def test_token_ids_prompt_and_cache_protocol(mt, reference):
    model, tok = mt
    ids, ref = reference
    cache = model.make_cache()
    gen = ar_tokens(model, cache, mx.array(ids), SamplingParams(temperature=0), prefill_step=7)
    got = [next(gen) for _ in range(5)]
    gen.close()
    assert got == ref[:5]
    # every yielded token has been fed: the cache holds prompt + yielded tokens
    assert {c.offset for c in cache} == {len(ids) + 5}
    # continuing from that cache with the uncached rest reproduces the reference
    gen = ar_tokens(model, cache, mx.array([got[-1]]), SamplingParams(temperature=0))
    for c in cache:
        c.trim(1)
    assert [next(gen) for _ in range(3)] == ref[5:8]
    gen.close()


def test_eos_ids_from_config_tokenizer_and_generation_config(mt, reference):
    model, tok = mt
    ids, ref = reference
    k = next(i for i in range(3, 30) if ref[i] not in ref[:i])
    chunks = list(stream_generate(model, tok, MSGS, max_tokens=40, temperature=0,
                                  generation_config={"eos_token_id": [ref[k]]}))
    assert [c.token_ids[0] for c in chunks] == ref[: k + 1]
    assert chunks[-1].finish_reason == "stop"
    # the eos token adds no text: the same as stopping by length just before it
    assert "".join(c.text for c in chunks) == generate(model, tok, MSGS, max_tokens=k, temperature=0)
    settings = resolve_settings(model, tok, generation_config={"eos_token_id": [ref[k]]})
    assert settings.eos_ids == {1, 2, 4, ref[k]}  # config.json [1, 2, 4] + tokenizer eos (1) + generation_config


def test_stop_strings_cut_the_text_at_every_position(mt):
    model, tok = mt
    full = generate(model, tok, MSGS, max_tokens=24, temperature=0)
    # stops apply to the answer only: after "</think>" and the newline that belongs to the tag
    at = full.index("</think>") + len("</think>")
    at += full[at:at + 1] == "\n"
    visible = [i for i in range(at, len(full) - 3) if full[i:i + 3].isprintable() and full[i:i + 3].strip()]
    assert visible
    for i in visible[::3]:
        stop = full[i:i + 3]
        first = full.find(stop, at)
        chunks = list(stream_generate(model, tok, MSGS, max_tokens=24, temperature=0, stop=[stop, "\x00never"]))
        assert "".join(c.text for c in chunks) == full[:first]
        assert chunks[-1].finish_reason == "stop"
    inside = next(full[i:i + 3] for i in range(2, at - 3) if full[i:i + 3].strip() and full[i:i + 3] not in full[at:])
    chunks = list(stream_generate(model, tok, MSGS, max_tokens=24, temperature=0, stop=[inside]))
    assert "".join(c.text for c in chunks) == full  # a stop inside the reasoning does not end the reply


def test_sampling_goes_through_sampling_module(mt, reference):
    model, tok = mt
    ids, ref = reference
    a = [c.token_ids[0] for c in stream_generate(model, tok, MSGS, max_tokens=12, temperature=1.0, seed=7)]
    b = [c.token_ids[0] for c in stream_generate(model, tok, MSGS, max_tokens=12, temperature=1.0, seed=7)]
    c = [c.token_ids[0] for c in stream_generate(model, tok, MSGS, max_tokens=12, temperature=1.0, seed=8)]
    assert a == b and a != c
    # top_k=1 leaves only the argmax: sampling at any temperature is greedy
    d = [c.token_ids[0] for c in stream_generate(model, tok, MSGS, max_tokens=12, temperature=1.5, top_k=1, seed=1)]
    assert d == ref[:12]
    # repetition penalty (mlx-lm's logits processor) changes a greedy run that repeats itself
    e = [c.token_ids[0] for c in stream_generate(model, tok, MSGS, max_tokens=40, temperature=0, repetition_penalty=3.0)]
    assert len(e) == 40 and e != ref


def test_context_limit(mt, reference):
    model, tok = mt
    ids, _ = reference
    n = len(ids)
    with pytest.raises(ValueError, match=rf"prompt \({n} tokens\) \+ max_tokens \(30\) = {n + 30} tokens exceeds the context limit of {n + 10}"):
        stream_generate(model, tok, MSGS, max_tokens=30, max_context=n + 10)
    with pytest.raises(ValueError, match=rf"the prompt is {n} tokens; the context limit is {n}"):
        stream_generate(model, tok, MSGS, max_context=n)
    # without max_tokens the budget is what is left of the context
    chunks = list(stream_generate(model, tok, MSGS, temperature=0, max_context=n + 6))
    assert len(chunks) == 6 and chunks[-1].finish_reason == "length"


def test_generation_config_defaults(tmp_path, mt):
    model, tok = mt
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 5,
         "repetition_penalty": 1.0, "eos_token_id": 9}))
    gc = read_generation_config(tmp_path)
    assert gc == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_tokens": 5,
                  "repetition_penalty": None, "eos_token_id": [9]}
    assert model_generation_config(SimpleNamespace(), SimpleNamespace(name_or_path=str(tmp_path))) == gc
    s = resolve_settings(model, tok, generation_config=gc, top_k=3)
    assert (s.params.temperature, s.params.top_p, s.params.top_k, s.default_max_tokens) == (0.7, 0.8, 3, 5)
    assert read_generation_config(tmp_path / "missing") == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert read_generation_config(tmp_path)["temperature"] == 0.0
    # the fixture checkpoint has none: documented fallbacks
    s = resolve_settings(model, tok)
    assert (s.params.temperature, s.params.top_p, s.params.top_k, s.params.min_p) == (
        FALLBACK_SETTINGS["temperature"], FALLBACK_SETTINGS["top_p"], 0, 0.0)
    chunks = list(stream_generate(model, tok, MSGS, generation_config={"max_tokens": 3, "temperature": 0.0}))
    assert len(chunks) == 3


def test_mtp_stream_equals_plain_greedy_and_reports_acceptance(mt, reference):
    model, tok = mt
    ids, ref = reference
    chunks = list(stream_generate(model, tok, MSGS, max_tokens=40, temperature=0, mtp=True, draft_depth=1))
    assert [c.token_ids[0] for c in chunks] == ref
    st = chunks[-1].stats
    assert st.draft_depth == 1 and len(st.acceptance) == 1 and st.tokens_per_verify >= 1.0


def test_mtp_settings_are_validated(mt, tmp_path):
    model, tok = mt
    with pytest.raises(ValueError, match="--draft-depth must be between 1 and 1"):
        stream_generate(model, tok, MSGS, mtp=True, draft_depth=2)
    # untuned default is plain decoding; a stored `tune` choice turns MTP on for this model only
    assert resolve_settings(model, tok).mtp is False
    assert resolve_settings(model, tok, draft_depth=1).mtp is True  # a depth implies MTP
    assert resolve_settings(model, tok, mtp=False, draft_depth=1).mtp is False
