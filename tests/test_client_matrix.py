"""The third-party client matrix (``benchmarks/client_matrix.py``) against the demo model served live.

One test per client and API style, skipped when the client is not installed (the ``clients`` extra
installs them all). Each runs the four scenarios (chat, stream, structured output through the client's
own helper, a forced tool call round trip) and fails on any ``FAIL`` cell; ``model`` cells (the toy
model's own answer, e.g. ``llm`` cannot force a tool call) are allowed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from client_matrix import run_case  # noqa: E402
from client_scenarios import KEY, MODEL, all_cases  # noqa: E402
from serverkit import live_server  # noqa: E402

CASES = {case.client: case for case in all_cases()}


@pytest.fixture(scope="module")
def base():
    from step35_mlx.loader import load
    from step35_mlx.server import create_app

    model, tok = load("demo")
    with live_server(create_app(model, tok, model_name=MODEL, api_key=KEY, max_queue=8)) as url:
        yield url


@pytest.mark.parametrize("client", list(CASES))
def test_client_scenarios(request, client):
    case = CASES[client]
    pytest.importorskip(case.module)  # before the server starts: no client installed, no server
    cells = run_case(case, request.getfixturevalue("base"))
    failed = [f"{c.scenario}: {c.detail}" for c in cells if c.status == "FAIL"]
    assert not failed, failed
    assert sum(c.status == "ok" for c in cells) >= 3, [(c.scenario, c.status, c.detail) for c in cells]
