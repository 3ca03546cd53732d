"""Long prompts through the server: prefill tokens/s, time to first token and peak memory at 8K-64K tokens.

Model: the tests' long-context checkpoint (``tests/longkit.py``: the release's layout scaled down,
64K context, sliding window 128, one full-attention head; float32 on the CPU). Each length sends one
chat request (a long system prompt and a short user message, a fresh one per length so no cache
helps) with ``max_tokens: 1`` and ``temperature: 0``: the wall time of that request is the time to
first token, and prompt tokens / that time the prefill rate.

Servers, each a subprocess on loopback, run one after the other:

- ours: ``step35-mlx serve --model DIR`` (default settings: prefix cache on, 8 GB RAM budget);
- mlx-lm: ``mlx_lm.server --model DIR`` on the same folder (its ``step3p5`` model reads the HF
  layout and drops the MTP layer), unless ``--no-mlx-lm``.

Peak memory is the server process's peak resident set (``VmHWM``), and that minus its resident set
after loading, read after each request (lengths run in increasing order, so each peak is that
length's). For ours they are printed beside the memory plan for a context of that length
(``step35_mlx.plan.plan_memory``, float32, unfused attention as on the CPU): its total (weights, KV,
activations and a fixed 1 GiB overhead) and its KV cache + activations.

Usage: ``python benchmarks/bench_long_prompt.py [--lengths 8K,16K,32K,64K] [--no-mlx-lm]
[--workdir DIR] [--json out.json]``. On the 2-core test machine: about 6 s at 8K, 25 s at 16K,
90 s at 32K and 6 min at 64K per server (the full layer's T^2 attention dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from longkit import long_text, write_long_checkpoint  # noqa: E402
from step35_mlx.plan import folder_weight_sizes, parse_tokens, plan_memory  # noqa: E402

MB = 1e6


@dataclass
class Row:
    server: str
    tokens: int
    ttft_s: float
    prefill_tps: float
    peak_mb: float  # peak resident set minus the resident set after loading
    peak_total_mb: float  # peak resident set
    plan_mb: float | None = None  # ours: the plan's KV + activations at this context
    plan_total_mb: float | None = None  # ours: the plan's total (weights, KV, activations, 1 GiB overhead)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Server:
    """A server subprocess; ``post`` sends JSON and returns (body, seconds)."""

    def __init__(self, name: str, argv: list[str], health: str, model: str) -> None:
        self.name, self.model = name, model
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{name} exited: {self.log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + health, timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start") from None
                time.sleep(0.5)
        self.base_rss_kb = _status_kb(self.proc.pid, "VmRSS")

    def peak_mb(self) -> tuple[float, float]:
        """(peak resident set minus the one after loading, peak resident set)."""
        peak = _status_kb(self.proc.pid, "VmHWM")
        return (peak - self.base_rss_kb) * 1e3 / MB, peak * 1e3 / MB

    def post(self, path: str, body: dict) -> tuple[dict, float]:
        req = urllib.request.Request(self.base + path, json.dumps(body).encode(), {"content-type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=3600) as resp:
            out = json.loads(resp.read())
        return out, time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(server: Server, tok, lengths: list[int], plan=None) -> list[Row]:
    server.post("/v1/chat/completions", {"model": server.model, "max_tokens": 1,  # warm-up: first-call costs
                                         "messages": [{"role": "user", "content": long_text(tok, 200, seed=0)}]})
    rows = []
    for n in lengths:
        messages = [{"role": "system", "content": long_text(tok, n - 64, seed=n)},
                    {"role": "user", "content": "Summarise the text above."}]
        body, secs = server.post("/v1/chat/completions", {"model": server.model, "messages": messages, "max_tokens": 1,
                                                         "temperature": 0})
        prompt = body["usage"]["prompt_tokens"]
        planned = plan(prompt) if plan is not None else (None, None)
        row = Row(server.name, prompt, secs, prompt / secs, *server.peak_mb(), *planned)
        rows.append(row)
        print(f"  {row.server:7s} {row.tokens:6d} tokens  TTFT {row.ttft_s:8.2f} s  prefill {row.prefill_tps:7.1f} tok/s"
              f"  peak RSS {row.peak_total_mb:7.1f} MB, +{row.peak_mb:6.1f} MB after load"
              + (f"  (plan: total {row.plan_total_mb:.1f} MB, KV + activations {row.plan_mb:.1f} MB)"
                 if row.plan_mb is not None else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8K,16K,32K,64K", help="prompt lengths in tokens (64K is the context)")
    ap.add_argument("--no-mlx-lm", action="store_true", help="only our server")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from step35_mlx.loader import load

    work = args.workdir or Path(tempfile.mkdtemp(prefix="step35-long-bench-"))
    folder = work / "tiny-long"
    if not (folder / "config.json").exists():
        write_long_checkpoint(folder)
    _, tok = load(folder)
    cap = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    lengths = sorted(min(parse_tokens(s), cap) for s in args.lengths.split(","))  # the template adds < 64 tokens
    weights = folder_weight_sizes(folder, 4)

    def plan(context: int) -> tuple[float, float]:
        p = plan_memory(json.loads((folder / "config.json").read_text()), recipe=weights, context=context,
                        activation_dtype_bytes=4, fused_attention=False)
        return (p.kv + p.activations) / MB, p.total / MB

    print(f"checkpoint {folder}; prompts {lengths} tokens; max_tokens 1, greedy")
    rows: list[Row] = []
    ours = Server("ours", [sys.executable, "-m", "step35_mlx", "serve", "--model", str(folder)], "/health", "m")
    try:
        rows += measure(ours, tok, lengths, plan)
    finally:
        ours.stop()
    if not args.no_mlx_lm:
        theirs = Server("mlx-lm", [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder),
                                   "--log-level", "WARNING"], "/v1/models", "default_model")
        try:
            rows += measure(theirs, tok, lengths)
        finally:
            theirs.stop()
        print("\n  tokens   TTFT ours / mlx-lm   prefill tok/s ours / mlx-lm (ratio)   peak RSS MB ours / mlx-lm")
        for r in [r for r in rows if r.server == "ours"]:
            t = next((x for x in rows if x.server == "mlx-lm" and abs(x.tokens - r.tokens) <= 64), None)
            if t is None:
                continue
            print(f"  {r.tokens:6d}   {r.ttft_s:7.2f} / {t.ttft_s:7.2f} s   {r.prefill_tps:7.1f} / {t.prefill_tps:7.1f}"
                  f" ({r.prefill_tps / t.prefill_tps:.2f}x)   {r.peak_total_mb:7.1f} / {t.peak_total_mb:7.1f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
