"""User mistakes at the command line: exit 2, one red `error:` line, no traceback (subprocesses, as typed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clirun import one_error_line, run_cli
from step35_mlx.hub import DEMO_DIR


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    """Make a damaged copy of the demo folder: ``demo_copy(name, damage)``."""
    root = tmp_path_factory.mktemp("models")

    def make(name: str, damage) -> Path:
        folder = root / name
        shutil.copytree(DEMO_DIR, folder)
        damage(folder)
        return folder

    return make


GENERATE = ["generate", "-p", "What is a tuple?", "-n", "4"]


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "seed must be an integer from 0 to 2**64 - 1, got -1"),
    (["--seed", str(2**64)], "seed must be an integer from 0 to 2**64 - 1"),
    (["-t", "nan"], "temperature must be a finite number >= 0, got nan"),
    (["--top-p", "inf"], "top_p must be in (0, 1]"),
    (["--draft-depth", "0"], "draft_depth must be 1, 2 or 3"),
    (["--max-tokens", "0"], "max_tokens must be >= 1"),
    (["--parallel", "tensor", "--streams", "2"], "--streams 2 does not work with --parallel"),
])
def test_bad_generation_settings(home, args, message):
    assert message in one_error_line(run_cli(GENERATE + args, home))


def test_prompts_that_are_not_text(home):
    line = one_error_line(run_cli(["generate", "-p", "-"], home, input=b"caf\xc3 \xff\xfe"))
    assert "standard input is not valid UTF-8" in line
    line = one_error_line(run_cli(["generate", "-p", b"bad \xff byte"], home))  # argv bytes, as a shell passes them
    assert "the prompt cannot be used: it is not valid UTF-8 (byte 0xff" in line


def test_a_chat_template_with_a_syntax_error(home, demo_copy):
    def damage(folder: Path) -> None:
        (folder / "chat_template.jinja").write_text("{% if messages %}{{ oops }")
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{% if messages %}{{ oops }"
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))

    line = one_error_line(run_cli(GENERATE + ["--model", str(demo_copy("template", damage))], home))
    assert "chat template" in line and "cannot be used" in line


def test_a_tokenizer_for_another_vocabulary(home, demo_copy):
    def damage(folder: Path) -> None:
        tok = json.loads((folder / "tokenizer.json").read_text())
        tok["added_tokens"].append({"id": 5000, "content": "<|stray|>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        (folder / "tokenizer.json").write_text(json.dumps(tok))

    line = one_error_line(run_cli(GENERATE + ["--model", str(demo_copy("vocab", damage))], home))
    assert "the tokenizer has token id 2048 but the model's vocab_size is 2048" in line


def test_a_generation_config_that_is_not_json_is_named_and_skipped(home, demo_copy):
    folder = demo_copy("genconf", lambda f: (f / "generation_config.json").write_text("{temperature: 0.7"))
    r = run_cli(GENERATE + ["--model", str(folder), "-t", "0"], home)
    assert r.returncode == 0, r.stderr
    assert f"warning: ignoring {folder / 'generation_config.json'}" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_a_bad_body_bound(home):
    assert "--max-body" in one_error_line(run_cli(["serve", "--max-body", "lots"], home))
