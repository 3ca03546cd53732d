#!/usr/bin/env python3
"""Third-party Python clients against ``step35-mlx serve``: a matrix of client x scenario.

Starts ``step35-mlx serve --model demo`` as a user types it (a subprocess on a free loopback port, private
HOME), then for every installed client (litellm, LangChain, openai-agents, pydantic-ai, llm; each API
style it has) runs four scenarios through the client's own API (``client_scenarios.py``):

- ``chat``: a plain request; the answer is non-empty text and usage is reported;
- ``stream``: the same streamed; the streamed text is non-empty;
- ``structured``: the client's structured-output helper with a pydantic model (``response_format``,
  ``with_structured_output``, ``output_type``, ``schema``); the result validates;
- ``tool``: a forced call to a ``get_weather`` tool, the client (or its agent loop) runs it and sends the
  result back, then a final text answer.

Cells: ``ok``, ``FAIL`` (the server's or the client's fault: a bug), ``model`` (the toy demo model's
answer was the reason), ``-`` (client not installed). Exits 1 on any FAIL.

    python benchmarks/client_matrix.py                      # every installed client, ~30 s on 2 CPU cores
    python benchmarks/client_matrix.py --only langchain --json out.json
    python benchmarks/client_matrix.py --base http://127.0.0.1:8080 # a server already running (key matrix-key)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import client_scenarios  # noqa: E402
from client_scenarios import KEY, MODEL, Case, ModelWeakness, all_cases  # noqa: E402
from clirun import start_serve  # noqa: E402

SCENARIOS = ("chat", "stream", "structured", "tool")


@dataclass
class Cell:
    client: str
    scenario: str
    status: str      # ok | FAIL | model | -
    detail: str
    seconds: float


def run_case(case: Case, base: str) -> list[Cell]:
    if find_spec(case.module) is None:
        return [Cell(case.client, s, "-", "not installed", 0.0) for s in SCENARIOS]
    cells = []
    for name in SCENARIOS:
        t = time.perf_counter()
        try:
            status, detail = "ok", case.scenarios[name](base)
        except ModelWeakness as e:
            status, detail = "model", str(e)
        except Exception as e:  # any failure of the client or the server is a row in the matrix
            status, detail = "FAIL", f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            traceback.print_exc(file=sys.stderr)
        cells.append(Cell(case.client, name, status, detail, round(time.perf_counter() - t, 2)))
    return cells


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def print_matrix(cases: list[Case], cells: list[Cell]) -> None:
    by = {(c.client, c.scenario): c for c in cells}
    width = max(len(c.client) for c in cases)
    print(f"{'client':<{width}}  {'version':<9} {'endpoint':<21}" + "".join(f"{s:<12}" for s in SCENARIOS))
    for case in cases:
        row = "".join(f"{by[case.client, s].status:<12}" for s in SCENARIOS)
        print(f"{case.client:<{width}}  {package_version(case.package):<9} {case.endpoint:<21}{row}")
    notes = [c for c in cells if c.status in ("FAIL", "model")]
    for c in notes:
        print(f"  {c.status} {c.client} / {c.scenario}: {c.detail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run clients whose label contains this (repeatable)")
    ap.add_argument("--base", help="root URL of a running server (its key must be %r) instead of starting one" % KEY)
    ap.add_argument("--json", type=Path, help="write the cells here")
    ap.add_argument("--temperature", type=float, default=client_scenarios.TEMPERATURE,
                    help="sampling temperature every client sends (default 0: greedy, the same answers every run)")
    args = ap.parse_args(argv)
    client_scenarios.TEMPERATURE = args.temperature
    cases = [c for c in all_cases() if not args.only or any(o.lower() in c.client.lower() for o in args.only)]
    serving = None
    with tempfile.TemporaryDirectory() as home:
        if args.base:
            base = args.base.rstrip("/")
        else:
            serving = start_serve(["--model", "demo", "--model-name", MODEL, "--api-key", KEY], Path(home))
            base = serving.base
        try:
            cells = [cell for case in cases for cell in run_case(case, base)]
        finally:
            if serving is not None:
                serving.stop()
    print_matrix(cases, cells)
    if args.json:
        versions = {c.package: package_version(c.package) for c in cases}
        args.json.write_text(json.dumps({"versions": versions, "cells": [asdict(c) for c in cells]}, indent=1))
    return 1 if any(c.status == "FAIL" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
