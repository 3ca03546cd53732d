"""Run ``step35-mlx`` in a subprocess exactly as a user types it, isolated from the user's files.

The console script is used when it is installed (CI: the editable install of this checkout);
``PYTHONPATH`` points at this checkout so the code under test is the code that runs. ``HOME``
is a fresh folder, so the tuned-choice store and the Hugging Face cache are the test's own,
and the Hub is offline.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command() -> list[str]:
    script = shutil.which("step35-mlx")
    return [script] if script else [sys.executable, "-m", "step35_mlx"]


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "STEP35_"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", COLUMNS="200", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], home: Path, *, input: bytes | str | None = None, timeout: float = 180,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``step35-mlx ARGS`` with ``input`` on stdin; stdout and stderr captured as text (bytes undecoded as \\ufffd)."""
    home.mkdir(parents=True, exist_ok=True)
    data = input.encode() if isinstance(input, str) else input
    r = subprocess.run(command() + list(args), input=data, capture_output=True, timeout=timeout, cwd=str(home),
                       env={**cli_env(home), **(extra_env or {})})
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))


def start_cli(args: list[str], home: Path) -> subprocess.Popen:
    """A long-running command (``serve``), its output merged into one text pipe."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command() + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(home), env=cli_env(home))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Serving:
    """A running ``step35-mlx serve``: its ``base`` URL and its first ``/health`` reply."""

    proc: subprocess.Popen
    base: str
    health: dict

    def stop(self) -> str:
        """Terminate the server; its whole output (stdout and stderr)."""
        self.proc.terminate()
        return self.proc.communicate(timeout=30)[0]


def start_serve(args: list[str], home: Path, *, within: float = 90) -> Serving:
    """``step35-mlx serve ARGS`` on a free loopback port, once ``/health`` answers (killed if it does not)."""
    port = free_port()
    proc = start_cli(["serve", *args, "--port", str(port)], home)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + within
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    return Serving(proc, base, json.loads(resp.read()))
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"serve did not answer /health within {within:g} s"
                time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=30)
        raise


def one_error_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """Assert the command failed the way user mistakes must: exit ``code``, no traceback, one ``error:`` line."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]
