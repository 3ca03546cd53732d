"""Every command, run as a subprocess the way a user types it: a command that crashes at start fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatkit import chat_model_dir
from clirun import one_error_line, run_cli, start_serve

NO_TRACEBACK = "Traceback"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


def test_version(home):
    r = run_cli(["--version"], home)
    assert r.returncode == 0 and r.stdout.strip() == "step35-mlx 0.1.0"


def test_generate_on_the_demo(home):
    r = run_cli(["generate", "-p", "What is a tuple?", "-t", "0", "-n", "12", "--json", "--streams", "2"], home)
    assert r.returncode == 0, r.stderr
    assert NO_TRACEBACK not in r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "length" and out["stats"]["generation_tokens"] == 12
    assert out["reasoning"], "the demo starts inside <think>"
    # the empty-answer note appears exactly when the 12 tokens ended inside the reasoning
    assert ("note: the answer is empty" in r.stderr) == (out["text"] == "")
    # from stdin, on one CPU stream (the run above used two): the same answer
    r2 = run_cli(["generate", "-p", "-", "-t", "0", "-n", "12", "--streams", "1", "--json"], home,
                 input="What is a tuple?\n")
    assert r2.returncode == 0, r2.stderr
    out2 = json.loads(r2.stdout)
    assert (out2["reasoning"], out2["text"]) == (out["reasoning"], out["text"])


def test_chat_through_a_pipe_survives_every_mishap(home, tmp_path):
    damaged = tmp_path / "damaged.session"
    damaged.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
    good = tmp_path / "good.session"
    script = b"".join([
        b"What is a list?\n",
        b"bad \xff\xfe bytes\n",  # not UTF-8
        b"/save /proc/step35-no-such-dir/x.session\n",  # a file system that refuses the write
        b"/load " + str(damaged).encode() + b"\n",
        b"/load " + str(tmp_path / "missing.session").encode() + b"\n",
        b"/save " + str(good).encode() + b"\n",
        b"And a tuple?\n",
        b"/stats\n",
        b"/exit\n",
    ])
    r = run_cli(["chat", "-t", "0", "-n", "6"], home, input=script)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert NO_TRACEBACK not in text
    errors = [line.partition("error: ")[2] for line in text.splitlines() if "error: " in line]
    assert len(errors) == 4, errors
    assert "not valid UTF-8" in errors[0] and errors[1].startswith("cannot save the session to /proc/")
    assert "not a step35-mlx session file" in errors[2] and "no session file" in errors[3]
    assert "answers: 2" in text  # the conversation went on after each mishap
    assert good.is_file() and not list(tmp_path.glob(".good.session.*"))


@pytest.mark.parametrize("api_key", [None, "secret-key"])
def test_serve_starts_and_answers(home, api_key):
    from openai import AuthenticationError, OpenAI

    srv = start_serve(["--model", "demo"] + (["--api-key", api_key] if api_key else []), home)
    base = srv.base
    try:
        assert srv.health["status"] == "ok" and srv.health["model"] == "step35-mlx-demo"
        client = OpenAI(base_url=f"{base}/v1", api_key=api_key or "unused", max_retries=0)
        reply = client.chat.completions.create(model="step35-mlx-demo", max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "What is a tuple?"}])
        assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
        if api_key:
            with pytest.raises(AuthenticationError):
                OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        out = srv.stop()
    assert NO_TRACEBACK not in out, out


def test_convert_verify_quant_eval(home, tmp_path):
    src = chat_model_dir()
    out = tmp_path / "q4"
    r = run_cli(["convert", str(src), "--out", str(out), "--bits", "4", "-q"], home)
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stdout and (out / "config.json").is_file()
    r = run_cli(["verify", str(out)], home)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "OK", r.stdout
    r = run_cli(["quant-eval", str(out), "--reference", str(src), "--max-tokens", "48", "--json"], home)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["num_tokens"] > 0 and metrics["kl"] > 0 and 0 <= metrics["top1_agreement"] <= 1


def test_plan_and_info(home):
    r = run_cli(["plan"], home)
    assert r.returncode == 0 and "q4" in r.stdout, r.stderr
    r = run_cli(["plan", "--model", "demo", "--json"], home)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)
    r = run_cli(["info", "demo"], home)
    assert r.returncode == 0 and r.stdout.startswith("step3p5: hidden"), r.stdout
    one_error_line(run_cli(["info", "/no/such/folder"], home))


def test_tune_on_the_demo(home):
    r = run_cli(["tune", "--model", "demo", "--tokens", "8", "--repeats", "1"], home)
    assert r.returncode == 0, r.stderr
    assert "default for this model is now" in r.stdout
    stored = json.loads((home / ".cache" / "step35-mlx" / "tune.json").read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["depth"] in (0, 1, 2, 3)
