"""ChatSession: later turns reuse the cache exactly (also past the sliding window), save/load, tools, interrupts."""

import mlx.core as mx
import numpy as np
import pytest

from chatkit import chat_model
from step35_mlx.model import DecoderLayer
from step35_mlx.session import ChatSession, _lcp

USER_TURNS = [
    "Hello! How are you?",
    "What is a list in Python?",
    "And a tuple? Tuples are immutable sequences.",
    "Thanks. The weather in Paris is sunny today.",
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
N = 10  # tokens per reply: longer than the ring's slack, so only the snapshot can roll back


@pytest.fixture(scope="module")
def mt():
    return chat_model()


def tokens_of(chunks):
    return [t for c in chunks for t in c.token_ids]


def fresh_reply(mt, messages, tools=None):
    """What a new session fed the whole history generates."""
    s = ChatSession(*mt, tools=tools, messages=messages, max_tokens=N, temperature=0)
    out = tokens_of(s.respond())
    assert s.last_stats.prefill_tokens == len(s.render(messages))
    return out


def check_cache_consistent(s):
    assert {c.offset for c in s.cache} == {len(s.cache_tokens)}


def test_turns_reuse_the_cache_and_match_a_fresh_session(mt):
    model, tok = mt
    assert model.config.sliding_window == 8
    s = ChatSession(model, tok, system="You are helpful.", max_tokens=N, temperature=0)
    prev_prompt = None
    for k, text in enumerate(USER_TURNS):
        prompt = s.render(s.messages + [{"role": "user", "content": text}])
        before = list(s.messages)
        got = tokens_of(s.send(text))
        assert len(got) == N
        check_cache_consistent(s)
        st = s.last_stats
        assert st.prompt_tokens == len(prompt)
        if prev_prompt is None:
            assert st.prefill_tokens == len(prompt) and s.last_reuse == "none"
        else:
            common = _lcp(prev_prompt, prompt)
            # the template dropped the previous reasoning: only "<think>\n" of the old prompt diverges
            assert common >= len(prev_prompt) - 2
            assert st.prefill_tokens == len(prompt) - common
            assert s.last_reuse == "snapshot"
            assert len(prompt) > 3 * (model.config.sliding_window + 8)  # well past the ring
        assert got == fresh_reply(mt, before + [{"role": "user", "content": text}])
        prev_prompt = prompt
    assert s.prefilled_tokens < len(prompt) + 3 * 16  # total prefill ~ one pass over the conversation


def test_save_load_round_trip_continues_identically(mt, tmp_path):
    model, tok = mt
    a = ChatSession(model, tok, system="Be brief.", max_tokens=N, temperature=0)
    for text in USER_TURNS[:2]:
        tokens_of(a.send(text))
    path = a.save(tmp_path / "chat.session")
    assert path.exists() and not (tmp_path / "chat.session.safetensors").exists()

    b = ChatSession(model, tok, max_tokens=N, temperature=0).load(path)
    assert b.messages == a.messages and b.cache_tokens == a.cache_tokens
    for ca, cb in zip(a.cache, b.cache):
        assert ca.offset == cb.offset
        n = ca.offset if cb.keys.shape[2] == ca.offset else ca.keys.shape[2]
        np.testing.assert_array_equal(np.array(ca.keys[..., :n, :]), np.array(cb.keys[..., :n, :]))
    ta = tokens_of(a.send(USER_TURNS[2]))
    tb = tokens_of(b.send(USER_TURNS[2]))
    assert ta == tb
    assert a.last_stats.prefill_tokens == b.last_stats.prefill_tokens < a.last_stats.prompt_tokens // 2
    assert b.last_reuse == "snapshot"
    assert a.messages == b.messages

    with pytest.raises(FileNotFoundError):
        ChatSession(model, tok).load(tmp_path / "missing")
    (tmp_path / "junk").write_text("not a session")
    with pytest.raises(ValueError, match="not a step35-mlx session"):
        ChatSession(model, tok).load(tmp_path / "junk")


def test_tool_results_and_next_user_turn(mt):
    model, tok = mt
    s = ChatSession(model, tok, tools=TOOLS, max_tokens=N, temperature=0)
    tokens_of(s.send("What is the weather in Paris?"))
    first_prompt = s.render(s.messages[:1])
    s.add_tool_result("get_weather", {"city": "Paris", "temperature": 21})
    assert s.messages[-1] == {"role": "tool", "name": "get_weather", "content": '{"city": "Paris", "temperature": 21}'}
    history = list(s.messages)
    prompt = s.render()
    assert "<tool_response>" in tok.decode(prompt)
    got = tokens_of(s.respond())
    assert got == fresh_reply(mt, history, TOOLS)
    assert s.last_stats.prefill_tokens <= len(prompt) - len(first_prompt) + 2
    check_cache_consistent(s)

    history = s.messages + [{"role": "user", "content": "Thanks!"}]
    got = tokens_of(s.send("Thanks!"))
    assert got == fresh_reply(mt, history, TOOLS)
    assert s.last_reuse == "snapshot"


def test_parsed_tool_calls_are_stored_in_the_message(mt):
    model, tok = mt
    s = ChatSession(model, tok, tools=TOOLS)
    s._store_reply("I will call it.\n</think>\nSure.<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                   "</parameter>\n</function>\n</tool_call>", "stop")
    msg = s.messages[-1]
    assert msg["reasoning_content"] == "I will call it." and msg["content"] == "Sure."
    assert msg["tool_calls"] == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    # the stored message renders back to the format the model produced
    s.messages.insert(0, {"role": "user", "content": "weather?"})
    s.add_tool_result("get_weather", "sunny")
    text = tok.decode(s.render())
    assert ("<|im_start|>assistant\n<think>\nI will call it.\n</think>\nSure.<tool_call>\n<function=get_weather>\n"
            "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>") in text


def test_interrupted_reply_is_kept_and_the_next_turn_is_exact(mt):
    model, tok = mt
    s = ChatSession(model, tok, max_tokens=N, temperature=0)
    stream = s.send(USER_TURNS[0])
    partial = [next(stream) for _ in range(4)]
    stream.close()
    msg = s.messages[-1]
    assert msg["role"] == "assistant" and msg.get("interrupted")
    assert msg["reasoning_content"] + msg["content"] != "" or all(c.text == "" for c in partial)
    check_cache_consistent(s)
    history = s.messages + [{"role": "user", "content": USER_TURNS[1]}]
    assert tokens_of(s.send(USER_TURNS[1])) == fresh_reply(mt, history)


def test_hard_interrupt_inside_the_forward_pass(mt, monkeypatch):
    """Ctrl-C landing inside a layer leaves layers at different offsets; the session repairs it."""
    model, tok = mt
    s = ChatSession(model, tok, max_tokens=N, temperature=0)
    tokens_of(s.send(USER_TURNS[0]))
    target = model.layers[2]
    calls = {"n": 0}
    original = DecoderLayer.__call__

    def flaky(self, *args, **kwargs):
        if self is target:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        tokens_of(s.send(USER_TURNS[1]))
    monkeypatch.setattr(DecoderLayer, "__call__", original)
    assert len({c.offset for c in s.cache}) == 1
    check_cache_consistent(s)
    history = s.messages + [{"role": "user", "content": USER_TURNS[2]}]
    assert tokens_of(s.send(USER_TURNS[2])) == fresh_reply(mt, history)


def test_reset_system_and_context_limit(mt):
    model, tok = mt
    s = ChatSession(model, tok, system="A.", max_tokens=N, temperature=0)
    tokens_of(s.send("hi"))
    s.set_system("B.")
    history = s.messages + [{"role": "user", "content": "again"}]
    assert tokens_of(s.send("again")) == fresh_reply(mt, history)
    # only "<bos><|im_start|>system\n" is shared and the rings cannot roll back that far: full prefill
    assert s.last_reuse == "none" and s.last_stats.prefill_tokens == s.last_stats.prompt_tokens
    s.reset()
    assert s.messages == [{"role": "system", "content": "B."}] and s.context_tokens == 0
    tokens_of(s.send("hi"))
    assert s.last_stats.prefill_tokens == s.last_stats.prompt_tokens

    small = ChatSession(model, tok, max_tokens=N, temperature=0, max_context=45)
    tokens_of(small.send("hi"))
    before = list(small.messages)
    with pytest.raises(ValueError, match=r"\+ max_tokens \(10\) = \d+ tokens exceeds the context limit of 45"):
        small.send("hi")
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens; the context limit is 45"):
        small.send("a long question " * 3)
    assert small.messages == before
    with pytest.raises(TypeError, match="unknown ChatSession setting"):
        ChatSession(model, tok, temprature=0)


def test_ask_returns_the_answer(mt):
    model, tok = mt
    s = ChatSession(model, tok, max_tokens=N, temperature=0)
    answer = s.ask("hi")
    assert answer == s.messages[-1]["content"]
    assert isinstance(mx.array(s.cache_tokens), mx.array)


def test_a_new_turn_finishes_an_abandoned_stream_first(mt):
    model, tok = mt
    s = ChatSession(model, tok, max_tokens=N, temperature=0)
    stream = s.send(USER_TURNS[0])
    next(stream), next(stream)
    history_tokens = tokens_of(s.send(USER_TURNS[1]))  # the first stream is closed before the new turn starts
    roles = [m["role"] for m in s.messages]
    assert roles == ["user", "assistant", "user", "assistant"] and s.messages[1].get("interrupted")
    assert history_tokens == fresh_reply(mt, s.messages[:3])
    del stream  # closing it again later changes nothing
    assert [m["role"] for m in s.messages] == roles
    # a stream that was never started
    s.send(USER_TURNS[2])
    tokens_of(s.send(USER_TURNS[3]))
    assert [m["role"] for m in s.messages][-4:] == ["user", "assistant", "user", "assistant"]
    assert s.messages[-3]["content"] == "" and s.messages[-3]["interrupted"]
    check_cache_consistent(s)


@pytest.mark.parametrize("kv_bits", [8])
def test_quantized_kv_cache_turns_and_save_load(mt, tmp_path, kv_bits):
    model, tok = mt
    with pytest.raises(ValueError, match="kv group size 64 does not divide the model's head dim 32"):
        ChatSession(model, tok, kv_bits=8, kv_group_size=64)
    s = ChatSession(model, tok, max_tokens=N, temperature=0, kv_bits=kv_bits)
    assert all(c.bits == kv_bits for c in s.cache)
    for text in USER_TURNS[:2]:
        before = s.messages + [{"role": "user", "content": text}]
        got = tokens_of(s.send(text))
        fresh = ChatSession(model, tok, messages=before, max_tokens=N, temperature=0, kv_bits=kv_bits)
        assert got == tokens_of(fresh.respond())
    assert s.last_reuse == "snapshot" and isinstance(s._snapshot.rings[1].keys, tuple)
    path = s.save(tmp_path / "q.session")
    b = ChatSession(model, tok, max_tokens=N, temperature=0).load(path)
    assert b.kv_bits == kv_bits and all(c.bits == kv_bits for c in b.cache)
    assert tokens_of(s.send(USER_TURNS[2])) == tokens_of(b.send(USER_TURNS[2]))
    assert s.last_stats.prefill_tokens == b.last_stats.prefill_tokens
