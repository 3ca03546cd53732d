"""`generate` and `serve` with --parallel on 2 local ranks (ring backend, loopback), against one process."""

from __future__ import annotations

import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from step35_mlx.cli import app
from step35_mlx.distributed.launch import spawn_local, start_local, wait_all

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "step35_mlx" / "demo" / "model"
ENV = {"PYTHONPATH": str(ROOT)}
PROMPT = "What is a tuple?"


def _single(args: list[str], input: str | None = None) -> str:
    """The same command in this process (the reference), stdout only."""
    r = CliRunner().invoke(app, args, input=input)
    assert r.exit_code == 0, r.output
    return r.stdout


def test_generate_parallel_matches_one_process(tmp_path):
    args = ["generate", "-p", PROMPT, "-t", "0", "-n", "40", "--json"]
    ref = json.loads(_single(args))
    ranks = spawn_local(2, ["-m", "step35_mlx", *args, "--parallel", "expert"], tmp_path, env=ENV, timeout=180)
    for r in ranks:
        assert r.returncode == 0, f"rank {r.rank}: {r.stderr[-2000:]}"
    got = json.loads(ranks[0].stdout)
    assert (got["text"], got["reasoning"]) == (ref["text"], ref["reasoning"])
    assert got["stats"]["generation_tokens"] == 40
    assert ranks[1].stdout == ""  # only rank 0 prints
    # per-rank copies: rank 1 started on rank 0's copy is refused, and rank 0 stops too instead of waiting
    r = CliRunner().invoke(app, ["split-model", str(DEMO), "--out", str(tmp_path / "parts"), "--parallel", "expert",
                                 "--ranks", "2"])
    assert r.exit_code == 0 and "rank 1: " in r.stdout, r.output
    bad = spawn_local(2, ["-m", "step35_mlx", *args, "--parallel", "expert", "--model", str(tmp_path / "parts" / "rank0")],
                      tmp_path, env=ENV, timeout=180)
    assert [r.returncode for r in bad] == [2, 2]
    assert "error: rank 1 could not load its share" in bad[0].stderr
    assert "error: this folder is the copy for rank 0 of 2 with --parallel expert; this is rank 1" in bad[1].stderr
    # without mlx.launch there is one rank: one red line, exit 2
    r = CliRunner().invoke(app, [*args, "--parallel", "expert"])
    assert r.exit_code == 2 and "error: --parallel needs several ranks" in r.output
    r = CliRunner().invoke(app, [*args, "--parallel", "sideways"])
    assert r.exit_code == 2 and "error: --parallel 'sideways': choose one of tensor, expert, pipeline" in r.output


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_parallel_one_request_and_concurrent_ones(tmp_path):
    from step35_mlx import generate as one_answer
    from step35_mlx.loader import load

    model, tok = load("demo")
    messages = [{"role": "user", "content": PROMPT}]
    expected = one_answer(model, tok, messages, max_tokens=30, temperature=0)
    port = _port()
    procs = start_local(2, ["-m", "step35_mlx", "serve", "--port", str(port), "--parallel", "pipeline",
                            "--split", "4,2", "--no-mtp"], tmp_path, env=ENV)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        deadline = time.time() + 90
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and all(p.poll() is None for p in procs), "server did not start"
                time.sleep(0.2)

        def ask(_):
            r = client.chat.completions.create(model="m", messages=messages, max_tokens=30, temperature=0)
            return (getattr(r.choices[0].message, "reasoning_content", None) or "") + "|" + (r.choices[0].message.content or "")

        first = ask(0)
        with ThreadPoolExecutor(3) as pool:  # concurrent requests run one after another on every rank
            rest = list(pool.map(ask, range(3)))
        assert rest == [first] * 3
        reasoning, _, content = first.partition("|")
        assert expected.strip() and expected.strip() in (reasoning + content).replace("\n</think>\n", "")
    finally:
        procs[0].send_signal(signal.SIGINT)
        results = wait_all(procs, 60)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank}: {r.stderr[-2000:]}"


def _answers(stdout: str) -> list[str]:
    """The chat transcript without the header, the demo note and the stats lines (speeds differ run to run)."""
    return [l for l in stdout.splitlines()
            if "tok/s" not in l and not l.startswith(("step35-mlx chat", "No --model given"))]


def test_chat_parallel_matches_one_process(tmp_path):
    script = "What is a tuple?\n/reset\nHello\n/save x.session\n/exit\n"
    args = ["chat", "-n", "12", "-t", "0"]
    ref = _answers(_single(args, input=script.replace("/save x.session\n", "")))
    procs = start_local(2, ["-m", "step35_mlx", *args, "--parallel", "pipeline"], tmp_path, env=ENV)
    ranks = wait_all(procs, 180, stdin=script)
    for r in ranks:
        assert r.returncode == 0, f"rank {r.rank}: {r.stderr[-2000:]}"
    got = _answers(ranks[0].stdout)
    assert "error: /save and /load are not available with --parallel (each rank holds part of the cache)" in "\n".join(got)
    assert [l for l in got if "/save" not in l] == ref
