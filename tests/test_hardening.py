"""Hostile and careless input: refused with a clear ValueError/OSError, never a crash, garbage or a lost session."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import warnings
from pathlib import Path

import mlx.core as mx
import pytest

from chatkit import chat_model
from step35_mlx.generate import read_generation_config, stream_generate
from step35_mlx.request_limits import MAX_JSON_DEPTH, RequestRejected, json_depth, parse_json_body
from step35_mlx.sampling import SamplingParams
from step35_mlx.session import ChatSession


@pytest.fixture(scope="module")
def mt():
    return chat_model()


# ---------------------------------------------------------------- token ids


@pytest.mark.parametrize("bad", [10**9, -1, "vocab"])
def test_out_of_range_ids_are_refused_not_read(mt, bad):
    model, _ = mt
    vocab = model.config.vocab_size
    bad = vocab if bad == "vocab" else bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, {vocab}\)"):
        model(mx.array([[1, 2, bad]]))
    with pytest.raises(ValueError, match=rf"token id {bad} at position 1 is outside the vocabulary \[0, {vocab}\)"):
        next(stream_generate(model, mt[1], [3, bad, 5], max_tokens=2, temperature=0))
    assert model(mx.array([[1, 2, vocab - 1]])).shape == (1, 3, vocab)  # the edge of the table is fine


@pytest.mark.parametrize("shape", [(3,), (1, 1, 3)])
def test_token_arrays_must_be_two_dimensional(mt, shape):
    model, _ = mt
    with pytest.raises(ValueError, match=r"2-D \[batch, length\]"):
        model(mx.ones(shape, dtype=mx.int32))
    with pytest.raises(ValueError, match="integer"):
        model(mx.ones((1, 3), dtype=mx.float32))


# ---------------------------------------------------------------- sampling settings


@pytest.mark.parametrize("kw, field", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"top_p": math.nan}, "top_p"), ({"top_p": math.inf}, "top_p"), ({"min_p": math.nan}, "min_p"),
])
def test_non_finite_sampling_values_are_refused(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw, match", [
    ({"seed": -1}, "seed must be an integer from 0 to 2\\*\\*64 - 1"), ({"seed": 2**64}, "seed"),
    ({"seed": 1.5}, "seed"), ({"draft_depth": 0}, "draft_depth must be 1, 2 or 3"),
    ({"draft_depth": 0, "mtp": True}, "draft_depth"), ({"temperature": math.nan}, "temperature"),
])
def test_generation_settings_are_checked_before_anything_runs(mt, kw, match):
    with pytest.raises(ValueError, match=match):
        stream_generate(*mt, "hello", max_tokens=2, **kw)


def test_largest_seed_is_accepted(mt):
    text = [c.text for c in stream_generate(*mt, "hello", max_tokens=2, seed=2**64 - 1)]
    assert len(text) == 2


@pytest.mark.parametrize("prompt", ["a lone \udcff byte", [{"role": "user", "content": "surrogate \ud800 here"}]])
def test_text_that_is_not_unicode_is_refused(mt, prompt):
    with pytest.raises(ValueError, match="not valid"):
        stream_generate(*mt, prompt, max_tokens=2)


def test_generation_config_that_is_not_json_warns_and_names_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{temperature: 0.7,")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_generation_config(tmp_path) == {}
    assert len(caught) == 1 and str(tmp_path / "generation_config.json") in str(caught[0].message)
    seen = []
    assert read_generation_config(tmp_path, warn=seen.append) == {} and "generation_config.json" in seen[0]


# ---------------------------------------------------------------- session files


def _saved(mt, path: Path) -> ChatSession:
    s = ChatSession(*mt, max_tokens=6, temperature=0)
    s.ask("What is a list?")
    s.save(path)
    return s


def _rewrite_meta(src: Path, dst: Path, change) -> None:
    """Copy a safetensors session file with its JSON metadata changed by ``change(meta)``."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["step35_mlx_session"])
    change(meta)
    header["__metadata__"]["step35_mlx_session"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _set(path, value):
    def change(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


CRAFTED = {
    "offset past the tokens": (_set(["layers", 0, "offset"], 10**6), "holds 1000000 positions"),
    "negative offset": (_set(["layers", 1, "offset"], -3), "offset must be an integer"),
    "id outside the vocabulary": (lambda m: m["cache_tokens"].__setitem__(0, 10**9), "cache_tokens"),
    "unknown role": (_set(["messages", 0, "role"], "wizard"), "role"),
    "messages not a list": (_set(["messages"], "hello"), "'messages' must be a list"),
    "layer missing": (lambda m: m["layers"].pop(), "cache layers"),
    "layer kind swapped": (lambda m: m["layers"][0].update(kind="sliding" if m["layers"][0]["kind"] == "full"
                                                           else "full"), "cache"),
    "KV bits nobody writes": (lambda m: [e.update(bits=3) for e in m["layers"]], "KV format"),
    "negative slack": (lambda m: [e.update(slack=-5) for e in m["layers"] if e["kind"] == "sliding"], "slack"),
    "unknown setting": (_set(["defaults", "evil"], 1), "defaults"),
    "array parts wrong": (lambda m: [e.update(parts=2) for e in m["layers"] if "parts" in e], "part"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_session_files_are_refused_and_the_session_is_kept(mt, tmp_path, case):
    change, match = CRAFTED[case]
    good = tmp_path / "good.session"
    _saved(mt, good)
    bad = tmp_path / "bad.session"
    _rewrite_meta(good, bad, change)
    live = ChatSession(*mt, max_tokens=6, temperature=0)
    live.ask("Hello!")
    before = (list(live.messages), list(live.cache_tokens))
    with pytest.raises(ValueError, match=match):
        live.load(bad)
    assert (live.messages, live.cache_tokens) == before
    assert live.ask("And then?") is not None  # still usable
    live.load(good)  # and a good file still loads
    assert live.messages[0]["content"] == "What is a list?"


def test_truncated_and_foreign_session_files_are_refused(mt, tmp_path):
    good = tmp_path / "good.session"
    _saved(mt, good)
    raw = good.read_bytes()
    live = ChatSession(*mt, max_tokens=6, temperature=0)
    for name, data in (("truncated", raw[: len(raw) - 100]), ("header only", raw[:60]), ("text", b"hello\n")):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError):
            live.load(p)
    assert live.messages == [] and live.cache_tokens == []


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs (needs root, as on the build machines); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_save_to_a_full_disk_raises_oserror_and_leaves_nothing(mt, small_fs):
    s = ChatSession(*mt, max_tokens=6, temperature=0)
    s.ask("What is a list? " * 20)
    with pytest.raises(OSError):
        s.save(small_fs / "chat.session")
    assert list(small_fs.iterdir()) == []
    assert s.ask("Still there?") is not None


def test_save_to_a_read_only_place_raises_oserror(mt, tmp_path):
    s = ChatSession(*mt, max_tokens=6, temperature=0)
    with pytest.raises(OSError):
        s.save(Path("/proc/step35-no-such-dir/chat.session"))


# ---------------------------------------------------------------- request bodies


def test_json_depth_and_constants():
    assert json_depth(1) == 0 and json_depth([]) == 1 and json_depth({"a": [{"b": 1}]}) == 3
    assert parse_json_body(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    for body in (b"[" * 100_000, b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1),
                 b'{"t": NaN}', b'{"t": Infinity}', b"\xff\xfe", b"{"):
        with pytest.raises(RequestRejected) as e:
            parse_json_body(body)
        assert e.value.status == 400
