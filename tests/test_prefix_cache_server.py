"""``serve --cache-disk``: a restarted server answers a conversation's next turn from the SSD tier; usage says so."""

from __future__ import annotations

import json
import urllib.request

import pytest

from chatkit import chat_model, chat_model_dir
from clirun import Serving, one_error_line, run_cli, start_serve
from step35_mlx.prefix_cache import PrefixCache
from step35_mlx.session import ChatSession

pytest.importorskip("uvicorn")

from serverkit import live_server  # noqa: E402  (needs uvicorn)

SYSTEM = "You are helpful. The weather in Paris is sunny today, 21 degrees."


def _post(base: str, path: str, body: dict) -> tuple[dict, dict]:
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read()), dict(resp.headers)


def serve_with_disk_cache(home, cache_dir) -> Serving:
    return start_serve(["--model", str(chat_model_dir()), "--cache-ram", "200KB", "--cache-disk", "20MB",
                        "--cache-dir", str(cache_dir)], home)


def test_restarted_server_serves_the_next_turn_from_disk(tmp_path):
    home, cache_dir = tmp_path / "home", tmp_path / "kv"
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a list in Python?"}]
    srv = serve_with_disk_cache(home, cache_dir)
    try:
        body, headers = _post(srv.base, "/v1/chat/completions",
                              {"model": "m", "messages": first, "max_tokens": 12, "temperature": 0})
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        reply = body["choices"][0]["message"]
    finally:
        out = srv.stop()
    assert "prefix cache:       RAM 200KB, SSD 20MB in" in out and "Traceback" not in out
    files = list(cache_dir.rglob("*.safetensors"))
    assert files and not [f for f in cache_dir.rglob(".*")]

    history = first + [{"role": "assistant", "content": reply["content"]},
                       {"role": "user", "content": "And a tuple?"}]
    srv = serve_with_disk_cache(home, cache_dir)
    try:
        assert srv.health["prefix_cache"]["disk_entries"] >= 2 and srv.health["prefix_cache"]["ram_entries"] == 0
        anth, headers = _post(srv.base, "/v1/messages", {"model": "m", "system": SYSTEM, "messages": history[1:],
                                                         "max_tokens": 12, "temperature": 0,
                                                         "thinking": {"type": "adaptive"}})
        usage = anth["usage"]
        prompt = int(headers["x-prompt-tokens"])
        assert usage["cache_read_input_tokens"] > len(chat_model()[1].apply_chat_template(
            first, add_generation_prompt=True)) - 3
        assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt
        assert int(headers["x-prefill-tokens"]) == usage["input_tokens"]
        with urllib.request.urlopen(srv.base + "/health", timeout=5) as resp:
            assert json.loads(resp.read())["prefix_cache"]["hits"] == 1
    finally:
        out = srv.stop()
    assert "Traceback" not in out and "warning" not in out

    model, tok = chat_model()
    fresh = ChatSession(model, tok, messages=history, max_tokens=12, temperature=0)
    for _ in fresh.respond():
        pass
    text = "".join(b.get("text", "") for b in anth["content"] if b["type"] == "text")
    thinking = "".join(b.get("thinking", "") for b in anth["content"] if b["type"] == "thinking")
    assert (thinking, text) == (fresh.messages[-1]["reasoning_content"], fresh.messages[-1]["content"])


def test_bad_cache_flags_are_one_error_line(tmp_path):
    home = tmp_path / "home"
    line = one_error_line(run_cli(["serve", "--model", "demo", "--cache-ram", "lots"], home))
    assert line.startswith("error: --cache-ram:")
    (tmp_path / "file").write_text("x")
    line = one_error_line(run_cli(["serve", "--model", "demo", "--cache-disk", "1GB", "--cache-dir",
                                   str(tmp_path / "file")], home))
    assert "is not a folder" in line


def test_plan_counts_the_ram_budget(tmp_path):
    home = tmp_path / "home"
    plain = run_cli(["plan", "--model", "demo", "--json"], home)
    cached = run_cli(["plan", "--model", "demo", "--json", "--cache-ram", "8GB"], home)
    assert plain.returncode == cached.returncode == 0, cached.stderr
    a, b = json.loads(plain.stdout)["plan"], json.loads(cached.stdout)["plan"]
    assert b["prefix_cache"] == 8 * 10**9 and b["total"] - a["total"] == 8 * 10**9


def test_concurrent_clients_share_the_cache_and_get_cold_answers():
    from concurrent.futures import ThreadPoolExecutor

    from step35_mlx.server import create_app

    model, tok = chat_model()
    app = create_app(model, tok, model_name="m", max_queue=8,
                     prefix_cache=PrefixCache(model, ram_bytes=10**7, block_size=16))
    convs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {k}: what is a list?"}]
             for k in range(3)]
    head = len(tok.apply_chat_template(convs[0][:1], add_generation_prompt=False))

    def ask(msgs):
        body, _ = _post(base, "/v1/chat/completions", {"model": "m", "messages": msgs, "max_tokens": 8,
                                                       "temperature": 0})
        return body["choices"][0]["message"]["content"], body["usage"]

    def cold(msgs):
        fresh = ChatSession(model, tok, messages=msgs, max_tokens=8, temperature=0)
        for _ in fresh.respond():
            pass
        return fresh.messages[-1]["content"]

    with live_server(app) as base:
        with ThreadPoolExecutor(3) as pool:
            first = list(pool.map(ask, convs))
            assert sorted(u["prompt_tokens_details"]["cached_tokens"] for _, u in first) == [0, head, head]
            for msgs, (answer, _) in zip(convs, first):
                assert answer == cold(msgs)
                msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And a tuple?"}]
            second = list(pool.map(ask, convs))
        for msgs, (answer, usage), (_, before) in zip(convs, second, first):
            assert usage["prompt_tokens_details"]["cached_tokens"] >= before["prompt_tokens"] - 2
            assert answer == cold(msgs)
        with urllib.request.urlopen(base + "/health", timeout=5) as resp:
            # two system-prompt hits, then at least two second turns the session's own cache could not serve
            assert json.loads(resp.read())["prefix_cache"]["hits"] >= 4


def test_chat_persists_through_the_disk_cache(tmp_path):
    home, kv = tmp_path / "home", tmp_path / "kv"
    args = ["chat", "--model", str(chat_model_dir()), "-n", "6", "-t", "0", "--system", SYSTEM,
            "--cache-disk", "20MB", "--cache-dir", str(kv)]
    first = run_cli(args, home, input="What is a list?\n")
    assert first.returncode == 0, first.stderr
    assert "cached" not in first.stdout
    again = run_cli(args, home, input="What is a list?\n")
    assert again.returncode == 0, again.stderr
    # the same opening turn: everything but the last prompt token comes from the SSD tier
    assert "prompt 1 new + " in again.stdout and " cached (disk)" in again.stdout, again.stdout
