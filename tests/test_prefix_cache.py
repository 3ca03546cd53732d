"""The prefix cache: hits are bit-identical to cold prefills, conversations share it, budgets hold, bad files go."""

from __future__ import annotations

import json
import threading

import mlx.core as mx
import numpy as np
import pytest

from chatkit import chat_model
from step35_mlx.cache import SlidingKVCache
from step35_mlx.generate import last_logits, new_cache, prefill, stream_generate
from step35_mlx.prefix_cache import PrefixCache
from step35_mlx.session import ChatSession

B = 16  # block size for the tests; the tiny model's window is 8 (ring of 16 slots)
P = np.random.RandomState(7).randint(5, 300, size=130).tolist()  # a prompt well past the window


@pytest.fixture(scope="module")
def mt():
    return chat_model()


def state(cache: list) -> list[np.ndarray]:
    """Every layer's keys and values that the next query can read: full layers rows 0..offset, rings the slots
    of the last window - 1 positions (a rolled-back ring's other slots hold positions the mask hides)."""
    out = []
    for c in cache:
        for x in (c.keys, c.values):
            for a in (x if isinstance(x, tuple) else (x,)):
                if isinstance(c, SlidingKVCache):
                    slots = [p % c.capacity for p in range(max(0, c.offset - c.window + 1), c.offset)]
                    a = a[..., mx.array(slots, dtype=mx.int32), :] if slots else a[..., :0, :]
                else:
                    a = a[..., :c.offset, :]
                out.append(np.array(a.astype(mx.float32)))
    return out


def cold_cache(model, tokens, kv_bits=None):
    cache = new_cache(model, kv_bits)
    prefill(model, cache, mx.array(tokens, dtype=mx.int32))
    return cache


def stored(model, tokens, kv_bits=None, **kw) -> PrefixCache:
    """A RAM prefix cache holding exactly the state after a cold prefill of ``tokens``."""
    pc = PrefixCache(model, ram_bytes=10**8, block_size=B, kv_bits=kv_bits, **kw)
    pc.capture(cold_cache(model, tokens, kv_bits), tokens)
    return pc


def greedy(model, tok, ids, **kw):
    return [t for c in stream_generate(model, tok, ids, max_tokens=200, temperature=0, **kw) for t in c.token_ids]


@pytest.fixture(scope="module")
def cold_tokens(mt):
    return greedy(*mt, P)


@pytest.mark.parametrize("n, entry_tail, expect", [
    (5, [], 5),            # below the window: the ring has not wrapped
    (8, [], 8),            # at the window
    (100, [], 100),        # past the window, inside a block (6 whole blocks + 4)
    (99, [301, 302, 303, 304, 305], 99),  # the cached prompt diverges from P inside its last block
])
def test_hit_is_bit_identical_to_a_cold_prefill(mt, cold_tokens, n, entry_tail, expect):
    model, tok = mt
    entry = P[:n] + entry_tail
    pc = stored(model, entry)
    cache = new_cache(model)
    hit = pc.restore(P, cache)
    assert (hit.length, hit.tier) == (expect, "ram")
    assert all(c.offset == expect for c in cache)
    for a, b in zip(state(cache), state(cold_cache(model, P[:expect]))):
        assert np.array_equal(a, b)
    prefill(model, cache, mx.array(P[expect:-1], dtype=mx.int32))
    warm = np.array(last_logits(model, mx.array([P[-1:]]), cache))
    cold = cold_cache(model, P[:-1])
    assert np.array_equal(warm, np.array(last_logits(model, mx.array([P[-1:]]), cold)))

    chunks = list(stream_generate(model, tok, P, max_tokens=200, temperature=0, prefix_cache=pc))
    assert [t for c in chunks for t in c.token_ids] == cold_tokens
    st = chunks[-1].stats
    assert st.prefill_tokens == len(P) - expect and st.cached_from == "ram"


def test_a_ring_that_cannot_roll_back_far_enough_is_not_used(mt):
    model, _ = mt
    pc = stored(model, P[:90] + list(range(301, 321)))  # diverges 20 tokens before the entry's end: > slack + 1
    cache = new_cache(model)
    assert pc.restore(P, cache).length == 0
    assert all(c.offset == 0 for c in cache)


def test_quantized_kv_hit_matches_the_cold_quantized_state(mt):
    model, _ = mt
    pc = stored(model, P[:100], kv_bits=8)
    cache = new_cache(model, 8)
    assert pc.restore(P, cache).length == 100
    for a, b in zip(state(cache), state(cold_cache(model, P[:100], 8))):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="KV format"):
        pc.restore(P, new_cache(model))  # a float cache never receives 8-bit entries


def test_three_interleaved_conversations_all_hit_after_their_first_turn(mt):
    model, tok = mt
    pc = PrefixCache(model, ram_bytes=10**8, block_size=B)
    server = ChatSession(model, tok, max_tokens=10, temperature=0, prefix_cache=pc)  # one session, like `serve`
    system = {"role": "system", "content": "You are helpful. The weather in Paris is sunny today, 21 degrees."}
    convs = {name: [system] for name in "abc"}
    head = len(tok.apply_chat_template([system], add_generation_prompt=False))
    prev_len: dict[str, int] = {}
    for turn in range(3):
        for name, msgs in convs.items():
            msgs.append({"role": "user", "content": f"{name} turn {turn}: what is a list? A tuple?"})
            ids = server.render(msgs)
            got = [t for c in server.generate_for(msgs) for t in c.token_ids]
            st = server.last_stats
            cached = st.prompt_tokens - st.prefill_tokens
            if turn == 0:
                # the first conversation prefilled the system prompt; the others found it cached
                assert cached == (0 if name == "a" else head)
            else:
                assert cached >= prev_len[name] - 2 and st.cached_from in ("ram", "session")
                assert server.last_reuse == "prefix-ram"  # the live cache held another conversation
            fresh = ChatSession(model, tok, messages=msgs, max_tokens=10, temperature=0)
            assert got == [t for c in fresh.respond() for t in c.token_ids]
            msgs.append(server.messages[-1])
            prev_len[name] = len(ids)


def _arrays_bytes(pc: PrefixCache) -> int:
    seen, total = set(), 0
    def add(x):
        nonlocal total
        for a in (x if isinstance(x, tuple) else (x,)):
            if id(a) not in seen:
                seen.add(id(a))
                total += a.size * a.itemsize
    for blk in pc.blocks.values():
        for k, v in blk.values():
            add(k), add(v)
    for e in pc.entries.values():
        for k, v in e.tail.values():
            add(k), add(v)
        for r in e.rings.values():
            add(r.keys), add(r.values)
    return total


def _disk_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_eviction_keeps_both_budgets_and_spills_to_disk(mt, tmp_path):
    model, _ = mt
    one = stored(model, P[:120]).ram_bytes  # one entry of 120 tokens
    pc = PrefixCache(model, ram_bytes=int(2.5 * one), disk_bytes=int(4.5 * one), cache_dir=tmp_path, block_size=B)
    prompts = [[300 - k] + P[1:120] for k in range(8)]  # distinct from the first token: no shared blocks
    for ids in prompts:
        pc.capture(cold_cache(model, ids), ids)
        pc.flush()
        assert _arrays_bytes(pc) == pc.ram_bytes <= pc.ram_budget
        assert _disk_bytes(pc.disk.folder) == pc.disk.nbytes <= pc.disk.budget
    assert len(pc.entries) == 2 and 3 <= len(pc.disk.entries) <= 4
    newest_on_disk_only = next(k for k in reversed(list(pc.disk.entries)) if k not in pc.entries)
    ids = pc.disk.entries[newest_on_disk_only].tokens.tolist() + [9]
    cache = new_cache(model)
    hit = pc.restore(ids, cache)
    assert (hit.length, hit.tier) == (120, "disk")  # evicted from RAM, served from the SSD tier
    for a, b in zip(state(cache), state(cold_cache(model, ids[:120]))):
        assert np.array_equal(a, b)
    assert pc.restore(prompts[0] + [9], new_cache(model)).length == 0  # the oldest left both tiers


def test_shared_prefixes_share_blocks(mt):
    model, _ = mt
    pc = PrefixCache(model, ram_bytes=10**8, block_size=B)
    pc.capture(cold_cache(model, P[:100]), P[:100])
    before = len(pc.blocks)
    pc.capture(cold_cache(model, P[:120]), P[:120])
    assert before == 6 and len(pc.blocks) == 7  # one new block: the first six are shared


def _damage(tmp_path, model):
    pc = PrefixCache(model, ram_bytes=10**8, disk_bytes=10**8, cache_dir=tmp_path, block_size=B)
    for k in range(5):
        ids = [200 + k] + P[1:40]
        pc.capture(cold_cache(model, ids), ids)
    pc.flush()
    return pc


def test_damaged_or_foreign_files_are_refused_and_removed(mt, tmp_path):
    model, _ = mt
    pc = _damage(tmp_path, model)
    folder = pc.disk.folder
    entries = sorted(pc.disk.entries.values(), key=lambda e: int(e.tokens[0]))
    corrupt, truncated, foreign, broken_block, crafted = (e.path for e in entries)
    raw = bytearray(corrupt.read_bytes())
    raw[8:40] = b"x" * 32
    corrupt.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    arrays, meta = mx.load(str(foreign), return_metadata=True)
    info = json.loads(meta["step35_mlx_prefix_cache"])
    info["cache"] = "0123456789abcdef-float32-s8-b16"  # another model's fingerprint
    mx.save_safetensors(str(foreign), arrays, metadata={"step35_mlx_prefix_cache": json.dumps(info)})
    arrays, meta = mx.load(str(crafted), return_metadata=True)
    info = json.loads(meta["step35_mlx_prefix_cache"])
    info["tokens"][5] += 1  # tokens that the key and block names do not hash to
    mx.save_safetensors(str(crafted), arrays, metadata={"step35_mlx_prefix_cache": json.dumps(info)})
    block = pc.disk.block_path(entries[3].blocks[-1])
    block.write_bytes(block.read_bytes()[:-64])

    warnings: list[str] = []
    again = PrefixCache(model, ram_bytes=10**8, disk_bytes=10**8, cache_dir=tmp_path, block_size=B,
                        warn=warnings.append)
    assert len(warnings) == 4 and {p.exists() for p in (corrupt, truncated, foreign, crafted)} == {False}
    assert "another model" in " ".join(warnings) and "do not match its tokens" in " ".join(warnings)
    ids = entries[3].tokens.tolist() + [9]
    cache = new_cache(model)
    assert again.restore(ids, cache).length == 0  # the entry's block is damaged: nothing is loaded
    assert all(c.offset == 0 for c in cache)
    assert len(warnings) == 5 and not broken_block.exists() and not block.exists()
    assert list(folder.iterdir()) == []  # nothing else referenced the remaining blocks


def test_another_kv_format_or_model_never_reads_these_files(mt, tmp_path):
    model, _ = mt
    pc = _damage(tmp_path, model)
    q8 = PrefixCache(model, ram_bytes=10**8, disk_bytes=10**8, cache_dir=tmp_path, block_size=B, kv_bits=8)
    assert q8.disk.folder != pc.disk.folder and not q8.disk.entries
    ids = [200] + P[1:40] + [9]
    assert q8.restore(ids, new_cache(model, 8)).length == 0
    assert pc.restore(ids, new_cache(model)).length == 40  # and the float files are still there


def test_concurrent_writer_never_exposes_a_half_written_entry(mt, tmp_path):
    model, _ = mt
    prompts = [[250 + k] + P[1:60] for k in range(12)]
    colds = {k: state(cold_cache(model, ids)) for k, ids in enumerate(prompts)}
    writer = PrefixCache(model, ram_bytes=10**8, disk_bytes=10**8, cache_dir=tmp_path, block_size=B)
    for ids in prompts:
        writer.capture(cold_cache(model, ids), ids)
    warnings: list[str] = []
    reader = PrefixCache(model, ram_bytes=0, disk_bytes=10**8, cache_dir=tmp_path, block_size=B,
                         warn=warnings.append)
    t = threading.Thread(target=writer.flush)
    t.start()
    hits = 0
    while t.is_alive() or hits < len(prompts):
        for k, ids in enumerate(prompts):
            cache = new_cache(model)
            hit = reader.restore(ids + [9], cache)
            if hit.length:
                assert hit.length == 60
                assert all(np.array_equal(a, b) for a, b in zip(state(cache), colds[k]))
                hits += 1
        if not t.is_alive() and hits == 0:
            break
    t.join()
    assert hits >= len(prompts) and not warnings


def test_hit_with_chunked_prefill_and_mtp_decoding_matches_cold(mt, cold_tokens):
    model, tok = mt
    pc = stored(model, P[:100])
    chunks = list(stream_generate(model, tok, P, max_tokens=60, temperature=0, prefill_step=7, mtp=True,
                                  draft_depth=1, prefix_cache=pc))
    assert [t for c in chunks for t in c.token_ids] == cold_tokens[:60]
    assert chunks[-1].stats.prefill_tokens == len(P) - 100 and chunks[-1].stats.draft_depth == 1


def test_stats_line_says_where_cached_tokens_came_from(mt):
    from step35_mlx.cli.common import stats_line

    model, tok = mt
    pc = stored(model, P[:100])
    st = list(stream_generate(model, tok, P, max_tokens=2, temperature=0, prefix_cache=pc))[-1].stats
    assert "prompt 30 new + 100 cached (ram)" in stats_line(st)
