"""`step35-mlx chat` / `generate` end to end: CliRunner for the commands, a real pseudo-terminal for chat."""

import json
import os
import re
import select
import signal
import struct
import sys
import time

import pytest
from typer.testing import CliRunner

from chatkit import chat_model, chat_model_dir
from step35_mlx import hub
from step35_mlx.cli import app
from step35_mlx.generate import stream_generate

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir():
    chat_model()  # import and build once
    return str(chat_model_dir())


def invoke(args, input=None):
    return runner.invoke(app, args, input=input)


def test_generate_json(model_dir):
    r = invoke(["generate", "--model", model_dir, "--prompt", "Hello there", "-n", "12", "-t", "0", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"text", "reasoning", "tool_calls", "finish_reason", "stats"}
    assert out["finish_reason"] == "length" and out["stats"]["generation_tokens"] == 12
    model, tok = chat_model()
    chunks = list(stream_generate(model, tok, [{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0))
    assert out["reasoning"] == "".join(c.reasoning for c in chunks)
    assert out["text"] == "".join(c.content for c in chunks)
    assert out["stats"]["prompt_tokens"] == chunks[-1].stats.prompt_tokens


def test_generate_stdin_system_tools_and_plain_output(model_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]))
    r = invoke(["generate", "--model", model_dir, "--prompt", "-", "--system", "Be brief.", "--tools", str(tools),
                "-n", "6", "-t", "0", "--json"], input="What is a tuple?\n")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stats"]["generation_tokens"] == 6
    r = invoke(["generate", "--model", model_dir, "-p", "hi", "-n", "5", "-t", "0", "--kv-bits", "8"])
    assert r.exit_code == 0
    assert "5 tokens" in r.stderr and "context" in r.stderr  # the stats line goes to stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/no/such/folder", "-p", "hi"], "model folder /no/such/folder does not exist"),
    (["generate", "--model", "{model}", "-p", "hi", "-n", "50", "--max-context", "30"], "exceeds the context limit of 30 tokens"),
    (["generate", "--model", "{model}", "-p", "-"], "the prompt is empty"),
    (["generate", "--model", "{model}", "-p", "hi", "--mtp", "--draft-depth", "3"], "--draft-depth must be between 1 and 1"),
    (["generate", "--model", "{model}", "-p", "hi", "--tools", "/no/tools.json"], "cannot read tools"),
    (["chat", "--model", "/no/such/folder"], "model folder /no/such/folder does not exist"),
    (["chat", "--model", "{model}", "--max-context", "999999"], "larger than the model's 4096 positions"),
    (["chat", "--model", "{model}", "--kv-bits", "3"], "kv_bits must be 4 or 8, got 3"),
    (["generate", "--model", "{model}", "-p", "hi", "--kv-bits", "2"], "kv_bits must be 4 or 8, got 2"),
])
def test_user_mistakes_are_one_red_line(model_dir, args, message):
    r = invoke([a.replace("{model}", model_dir) for a in args], input="")
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1


def test_chat_commands(model_dir, tmp_path):
    session_file = tmp_path / "s.session"
    script = "\n".join([
        "Hello there", "/stats", "/system Be brief.", "/system", "second question",
        f"/save {session_file}", "/reset", "/stats", f"/load {session_file}", "/load /no/file", "/bogus", "/help",
        "third question", "/exit", "never read",
    ]) + "\n"
    r = invoke(["chat", "--model", model_dir, "-n", "8", "-t", "0"], input=script)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "context limit 4096 tokens" in out
    assert re.search(r"8 tokens, [\d.]+ tok/s · prompt \d+ new at \d+ tok/s · context \d+/4096", out)
    assert "answers: 1 · context" in out and "system prompt set" in out and "system prompt: 'Be brief.'" in out
    assert "saved 5 messages and" in out and "conversation cleared" in out and "answers: 0 · context 0/4096" in out
    assert "loaded 5 messages" in out and "error: no session file at /no/file" in out
    assert "unknown command /bogus" in out and "/save PATH" in out
    # the third question after /load reuses the loaded cache
    assert re.search(r"prompt \d+ new \+ \d+ cached", out.split("loaded 5 messages")[1])
    assert session_file.exists()


def test_chat_hide_reasoning_and_ctrl_d(model_dir):
    r = invoke(["chat", "--model", model_dir, "-n", "7", "-t", "0", "--hide-reasoning"], input="Hello\n")
    assert r.exit_code == 0, r.output  # end of input = Ctrl-D
    assert "[thought for 7 tokens]" in r.stdout


def test_chat_defaults_to_the_demo_model(model_dir, monkeypatch):
    monkeypatch.setattr(hub, "DEMO_DIR", hub.Path(model_dir))
    r = invoke(["chat", "-n", "3", "-t", "0"], input="hi\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "No --model given: using the bundled demo model" in r.stdout
    monkeypatch.setattr(hub, "DEMO_DIR", hub.Path("/no/demo"))
    r = invoke(["chat"], input="")
    assert r.exit_code == 2 and "the bundled demo model is not installed" in r.stderr


# ---------------------------------------------------------------- a real terminal

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Za-z0-9]|\x1b[=>]|\r")


class Terminal:
    def __init__(self, fd: int, pid: int) -> None:
        self.fd, self.pid, self.raw = fd, pid, b""

    @property
    def text(self) -> str:
        return _ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait_for(self, pred, timeout: float, since: int = 0) -> str:
        end = time.monotonic() + timeout
        while True:
            text = self.text[since:]
            if pred(text):
                return text
            if time.monotonic() > end:
                raise AssertionError(f"timed out; terminal so far:\n{self.text[-3000:]}")
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    if pred(self.text[since:]):
                        return self.text[since:]
                    raise AssertionError(f"terminal closed; output:\n{self.text[-3000:]}")
                self.raw += data


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_chat_in_a_pseudo_terminal(model_dir):
    import fcntl
    import pty
    import termios

    argv = [sys.executable, "-c", "from step35_mlx.cli import app; app()", "chat", "--model", model_dir,
            "--max-tokens", "4000", "--temperature", "0"]
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    pid, fd = pty.fork()
    if pid == 0:  # child: the chat, on the pseudo-terminal
        try:
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    term = Terminal(fd, pid)
    try:
        term.wait_for(lambda t: ">>> " in t, 90)

        def turn(message: bytes) -> str:
            start = len(term.text)
            term.write(message + b"\r")
            # the answer streams: wait for some of it, then press Ctrl-C mid-answer
            term.wait_for(lambda t: len(t) > len(message) + 80, 60, since=start)
            term.write(b"\x03")
            return term.wait_for(
                lambda t: "[interrupted]" in t and re.search(r"context \d+/4096 · peak [\d.]+ [MG]B · interrupted", t)
                and t.rstrip().endswith(">>>"), 60, since=start)

        first = turn(b"Hello there, tell me about lists")
        n = int(re.search(r"(\d+) tokens, [\d.]+ tok/s", first).group(1))
        assert 0 < n < 4000  # stopped mid-answer
        second = turn(b"And what about tuples?")
        # the session went on: the second prompt reused the cache of the first turn
        assert re.search(r"prompt \d+ new \+ \d+ cached", second)
        start = len(term.text)
        term.write(b"/stats\r")
        stats = term.wait_for(lambda t: "answers: 2" in t and t.rstrip().endswith(">>>"), 30, since=start)
        assert "tokens prefilled in this session" in stats
        term.write(b"/exit\r")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            try:
                select.select([fd], [], [], 0.1)
                os.read(fd, 65536)
            except OSError:
                pass
        else:
            raise AssertionError("chat did not exit after /exit")
        assert os.waitstatus_to_exitcode(status) == 0
        pid = None
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(fd)


def test_generation_config_json_sets_the_defaults(model_dir, tmp_path):
    import shutil

    folder = tmp_path / "with-gen-config"
    shutil.copytree(model_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 4}))
    r = invoke(["generate", "--model", str(folder), "-p", "hi", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["stats"]["generation_tokens"] == 4
    model, tok = chat_model()
    greedy = list(stream_generate(model, tok, [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0))
    assert out["reasoning"] + out["text"] == "".join(c.reasoning + c.content for c in greedy)


def test_chat_turn_over_the_context_is_an_error_line_and_the_chat_goes_on(model_dir):
    long = "tell me everything about lists and tuples " * 4
    r = invoke(["chat", "--model", model_dir, "-n", "8", "-t", "0", "--max-context", "48"],
               input=f"hi\n{long}\n/stats\n/exit\n")
    assert r.exit_code == 0, r.output
    assert re.search(r"error: the prompt is \d+ tokens; the context limit is 48 tokens", r.stdout)
    assert "answers: 1 · context" in r.stdout
