"""lm-evaluation-harness against ``step35-mlx serve`` (issue 13): ``benchmarks/lm_eval_server.py`` run for real.

It serves the demo model as a subprocess, runs lm-eval's ``local-completions`` on a local 4-choice
task (``--limit 10``: 40 loglikelihood requests) with token-id and with text requests, and with the
server's own ``/tokenize`` as lm-eval's tokenizer, and recomputes
every logged loglikelihood in-process in float64. Needs the ``eval`` extra (skipped without it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clirun import REPO, cli_env

pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")


def test_lm_eval_loglikelihoods_equal_the_models_log_softmax(tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lm_eval_server.py"), "--runner", "api",
                        "--limit", "10", "--json", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path), env=cli_env(tmp_path / "home"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and [row["mode"] for row in res["rows"]] == ["tokens", "text", "remote"]
    assert "tokenizer=" not in res["rows"][2]["command"][res["rows"][2]["command"].index("--model_args") + 1]
    for row in res["rows"]:
        assert row["requests"] == 40 and row["greedy_agree"] == 40
        assert row["max_abs_diff"] <= 1e-4
        assert row["lm_eval_acc"] == row["our_acc"]
