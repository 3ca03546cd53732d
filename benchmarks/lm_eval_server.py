#!/usr/bin/env python3
"""lm-evaluation-harness against ``step35-mlx serve``, checked against the model's own log-softmax.

1. Starts ``step35-mlx serve --model MODEL --port P`` on a free loopback port, as a user types it.
2. Runs the ``lm_eval`` CLI (a subprocess) with ``--model local-completions``, the local
   multiple-choice task in ``benchmarks/lm_eval_task`` (``--include_path``), ``--limit``,
   ``--log_samples``; once per request mode:
   - ``tokens``: lm-eval's default, it tokenizes with the model folder's tokenizer and sends token
     ids (no bos: the demo's tokenizer adds none);
   - ``text``: ``tokenized_requests=False``, it sends text and the server tokenizes it, bos first;
   - ``remote``: text as above, and no tokenizer argument: lm-eval's default backend finds the
     server's ``/tokenizer_info`` + ``/tokenize`` and counts tokens with them.
3. Recomputes every logged loglikelihood in-process: lm-eval's context/continuation split
   redone with our loader's tokenizer, one uncached forward over the whole sequence, float64
   log-softmax in NumPy; prints max |diff|, the is_greedy agreement and the accuracy (lm-eval's
   and the one our own log-likelihoods give).

Exits 1 when a diff exceeds ``--tol`` (1e-4) or an is_greedy flag disagrees, 2 on an error.
``--runner api`` calls ``lm_eval.simple_evaluate`` in this process instead of the CLI, with the same
model arguments and only this task indexed (the CLI indexes every built-in task first, ~10 s):
what ``tests/test_lm_eval.py`` runs.

    python benchmarks/lm_eval_server.py                    # all three modes, --limit 10; ~1.5 min on 2 CPU cores
    python benchmarks/lm_eval_server.py --mode text --runner api --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import chdir
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from step35_mlx import load  # noqa: E402
from step35_mlx.hub import ModelNotFoundError, resolve_model  # noqa: E402

TASK_DIR = REPO / "benchmarks" / "lm_eval_task"
TASK = "step35_pydocs_mc"
MODES = ("tokens", "text", "remote")


@dataclass
class ModeResult:
    """One lm-eval run checked against the in-process reference."""

    mode: str
    requests: int
    max_abs_diff: float
    greedy_agree: int
    lm_eval_acc: float
    our_acc: float
    seconds: float
    command: list[str]


@dataclass
class LmEvalRun:
    """What lm-eval logged: one sample per document (its requests' ``resps``), and its accuracy."""

    samples: list[dict]
    acc: float


@dataclass
class Agreement:
    """lm-eval's logged values against the in-process reference."""

    requests: int
    max_abs_diff: float
    greedy_agree: int
    our_acc: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    script = shutil.which("step35-mlx")
    return [script] if script else [sys.executable, "-m", "step35_mlx"]


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # the task data and tokenizer are local


def child_env() -> dict[str, str]:
    """This checkout's code in the children, offline."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **OFFLINE}


def start_server(model: str, port: int, log: Path) -> subprocess.Popen:
    """``step35-mlx serve`` in the background (see :func:`wait_ready`)."""
    with log.open("w") as f:
        return subprocess.Popen(serve_command() + ["serve", "--model", model, "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)


def wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Return once ``/health`` answers; raise when the server exits or takes over 120 s."""
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not answer /health within 120 s") from None
            time.sleep(0.2)


def served_model_name(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def model_args(name: str, port: int, tokenizer_dir: Path, mode: str) -> str:
    args = [f"model={name}", f"base_url=http://127.0.0.1:{port}/v1/completions"]
    if mode != "remote":
        args += ["tokenizer_backend=huggingface", f"tokenizer={tokenizer_dir}"]
    if mode != "tokens":
        args.append("tokenized_requests=False")
    return ",".join(args)


def lm_eval_command(args: str, limit: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
            "--tasks", TASK, "--include_path", str(TASK_DIR.relative_to(REPO)), "--limit", str(limit),
            "--log_samples", "--output_path", str(out)]


def run_lm_eval_cli(cmd: list[str], out: Path) -> LmEvalRun:
    """Run the CLI from the repo root (the task's ``data_files`` is relative to it): samples and acc."""
    r = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    samples = [json.loads(line) for f in sorted(out.rglob(f"samples_{TASK}_*.jsonl")) for line in f.open()]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return LmEvalRun(samples, float(results["results"][TASK]["acc,none"]))


def run_lm_eval_api(args: str, limit: int) -> LmEvalRun:
    """``lm_eval.simple_evaluate`` in this process, only ``benchmarks/lm_eval_task`` indexed: samples and acc."""
    os.environ.update(OFFLINE)
    import lm_eval
    from lm_eval.tasks import TaskManager

    with chdir(REPO):
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[TASK], limit=limit,
                                      log_samples=True,
                                      task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))
    return LmEvalRun(out["samples"][TASK], float(out["results"][TASK]["acc,none"]))


def encode_pair(tokenizer: Any, context: str, continuation: str, bos: bool) -> tuple[list[int], list[int]]:
    """lm-eval's split (trailing context spaces move to the continuation; the continuation is what
    the whole text's tokens hold past the context's), with a bos in front when the server adds one."""
    if not context:
        raise ValueError("an empty context is not supported by this check")
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=False))
    ctx = list(tokenizer.encode(context, add_special_tokens=False))
    return ([tokenizer.bos_token_id] if bos else []) + ctx, whole[len(ctx):]


def reference_loglikelihood(model: Any, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of float64 log-softmax over the continuation, and whether every token is the argmax."""
    ids = ctx + cont
    logits = np.asarray(model(mx.array(ids)[None])[0].astype(mx.float32), dtype=np.float64)[len(ctx) - 1:-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(sum(logp[k, t] for k, t in enumerate(cont))), bool(all(logp[k].argmax() == t
                                                                         for k, t in enumerate(cont)))


def request_args(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) of each request: tuples in memory, ``{"gen_args_i": {"arg_0", "arg_1"}}`` in JSONL."""
    args = sample["arguments"]
    return [(a["arg_0"], a["arg_1"]) for a in args.values()] if isinstance(args, dict) else [tuple(a) for a in args]


def check(samples: list[dict], model: Any, tokenizer: Any, mode: str,
          memo: dict[tuple[int, ...], tuple[float, bool]]) -> Agreement:
    """Every logged request recomputed (``memo``: reference values by sequence, shared across modes);
    the accuracy is what our own log-likelihoods pick."""
    n = agree = correct = 0
    worst = 0.0
    for s in samples:
        ours = []
        for i, (context, continuation) in enumerate(request_args(s)):
            got, got_greedy = float(s["resps"][i][0][0]), str(s["resps"][i][0][1]) == "True"  # JSONL: strings
            ctx, cont = encode_pair(tokenizer, context, continuation, bos=mode != "tokens")
            key = (len(ctx), *ctx, *cont)
            if key not in memo:
                memo[key] = reference_loglikelihood(model, ctx, cont)
            ref, greedy = memo[key]
            worst = max(worst, abs(got - ref))
            agree += got_greedy == greedy
            n += 1
            ours.append(ref)
        correct += int(np.argmax(ours)) == int(s["target"])
    return Agreement(n, worst, agree, correct / len(samples))


def run_modes(a: argparse.Namespace) -> list[ModeResult]:
    """Serve the model, run lm-eval once per mode against it, check each run."""
    folder = resolve_model(a.model, allow_download=False)
    port = free_port()
    rows, memo = [], {}
    with tempfile.TemporaryDirectory(prefix="lm_eval_server_") as tmp:
        log = Path(tmp) / "serve.log"
        server = start_server(a.model, port, log)
        try:
            model, tokenizer = load(folder)  # while the server starts
            wait_ready(server, port, log)
            name = served_model_name(port)
            for mode in MODES if a.mode == "all" else (a.mode,):
                args = model_args(name, port, folder, mode)
                cmd = lm_eval_command(args, a.limit, Path(tmp) / mode)
                print("$" if a.runner == "cli" else "simple_evaluate, as", " ".join(cmd), flush=True)
                t0 = time.perf_counter()
                run = run_lm_eval_cli(cmd, Path(tmp) / mode) if a.runner == "cli" else run_lm_eval_api(args, a.limit)
                seconds = time.perf_counter() - t0
                c = check(run.samples, model, tokenizer, mode, memo)
                rows.append(ModeResult(mode, c.requests, c.max_abs_diff, c.greedy_agree, run.acc, c.our_acc, seconds,
                                       cmd))
        finally:
            server.terminate()
            server.wait(30)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="what `step35-mlx serve --model` takes (default: demo)")
    ap.add_argument("--mode", choices=[*MODES, "all"], default="all")
    ap.add_argument("--runner", choices=["cli", "api"], default="cli",
                    help="the lm_eval CLI in a subprocess, or simple_evaluate in this process")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    if find_spec("lm_eval") is None:
        print("error: lm-evaluation-harness is not installed: pip install -e \".[eval]\"", file=sys.stderr)
        return 2
    try:
        rows = run_modes(a)
    except (RuntimeError, ValueError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'mode':7} {'requests':>8} {'max|diff|':>10} {'is_greedy agree':>16} {'acc lm-eval':>11} "
          f"{'acc ours':>8} {'lm_eval s':>9}")
    for r in rows:
        print(f"{r.mode:7} {r.requests:8d} {r.max_abs_diff:10.2e} {f'{r.greedy_agree}/{r.requests}':>16} "
              f"{r.lm_eval_acc:11.3f} {r.our_acc:8.3f} {r.seconds:9.1f}")
    ok = all(r.max_abs_diff <= a.tol and r.greedy_agree == r.requests for r in rows)
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "runner": a.runner, "limit": a.limit, "tol": a.tol, "ok": ok,
                                      "rows": [asdict(r) for r in rows]}, indent=2))
    print("OK" if ok else f"FAIL: a diff above {a.tol:g} or an is_greedy disagreement")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
