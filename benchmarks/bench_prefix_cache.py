"""Prefix cache on an agent-like trace, through the real server (``step35-mlx serve`` subprocesses).

Trace: three conversations of 10 turns, interleaved (a1 b1 c1 a2 b2 ...), sharing a ~2K-token
system prompt; odd turns send a tool result (~120 tokens), even turns a user message; replies are
greedy, 24 tokens. The longest prompt comes close to the demo model's 4096-token context.

Modes (same trace, greedy, so every mode must produce the same replies -- checked):

- ``no reuse``: ``--cache-ram 0``; each prompt rendered client-side and sent to ``/v1/completions``,
  which prefills it whole;
- ``single session``: ``--cache-ram 0``; ``/v1/chat/completions`` (today's one-conversation reuse);
- ``RAM cache``: ``--cache-ram 4GB``;
- ``disk, restart``: ``--cache-ram 4GB --cache-disk 16GB``; the server is stopped after turn 5 and
  started again, so turns 6-10 start from an empty RAM tier and the SSD tier.

Printed per mode: total prompt tokens, total prefill tokens (the server's ``x-prefill-tokens``),
prefill reduction versus no reuse, mean time to first token (time to the first streamed byte,
which the server sends once the first token exists), and the cache's RAM and disk bytes
(``/health``). Usage: ``python benchmarks/bench_prefix_cache.py [--json out.json]``.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from step35_mlx import load  # noqa: E402
from step35_mlx.reasoning import split_reasoning  # noqa: E402

TURNS, CONVS, REPLY = 10, 3, 24


def _text_pool() -> list[str]:
    """Deterministic prose to fill prompts: the repository's own documentation, by paragraph."""
    paras = []
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        paras += [p.strip() for p in f.read_text().split("\n\n") if len(p.strip()) > 80]
    return paras


def _take(pool: list[str], start: int, tokens: int, tok) -> str:
    out, n, i = [], 0, start
    while n < tokens:
        p = pool[i % len(pool)]
        out.append(p)
        n += len(tok.encode(p, add_special_tokens=False))
        i += 1
    text = "\n\n".join(out)
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    return tok.decode(ids)


class Server:
    def __init__(self, flags: list[str], home: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home)}
        self.proc = subprocess.Popen([sys.executable, "-m", "step35_mlx", "serve", "--model", "demo", "--port",
                                      str(self.port), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            try:
                self.health()
                return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.2)

    def health(self) -> dict:
        with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
            return json.loads(r.read())

    def stream(self, path: str, body: dict) -> tuple[float, int, int, str]:
        """(seconds to the first streamed byte, prefill tokens, prompt tokens, the reply's answer text)."""
        req = urllib.request.Request(self.base + path, json.dumps({**body, "stream": True}).encode(),
                                     {"content-type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            first = r.readline()
            ttft = time.perf_counter() - t0
            prefill, prompt = int(r.headers["x-prefill-tokens"]), int(r.headers["x-prompt-tokens"])
            raw, answer = [], []
            for line in [first] + list(r):
                line = line.decode().strip()
                if not line.startswith("data: {"):
                    continue
                for ch in json.loads(line[6:])["choices"]:
                    raw.append(ch.get("text") or "")  # /v1/completions: reasoning, </think> and answer
                    answer.append((ch.get("delta") or {}).get("content") or "")  # chat: the answer alone
        text = split_reasoning("".join(raw), in_reasoning=True)[1] if path == "/v1/completions" else "".join(answer)
        return ttft, prefill, prompt, text

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=60)


def run_mode(mode: str, flags: list[str], tok, system: str, inputs: dict, home: Path) -> dict:
    srv = Server(flags, home)
    convs = {k: [{"role": "system", "content": system}] for k in range(CONVS)}
    rows, replies = [], []
    for t in range(TURNS):
        if mode == "disk, restart" and t == TURNS // 2:
            srv.stop()
            srv = Server(flags, home)
        for k in range(CONVS):
            msgs = convs[k]
            msgs.append(inputs[k][t])
            body = {"model": "demo", "max_tokens": REPLY, "temperature": 0}
            if mode == "no reuse":
                prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                ttft, prefill, n, answer = srv.stream("/v1/completions", {**body, "prompt": prompt})
            else:
                ttft, prefill, n, answer = srv.stream("/v1/chat/completions", {**body, "messages": msgs})
            msgs.append({"role": "assistant", "content": answer})
            rows.append((ttft, prefill, n))
            replies.append(answer)
    usage = srv.health().get("prefix_cache") or {}
    srv.stop()
    return {"mode": mode, "prompt_tokens": sum(r[2] for r in rows), "prefill_tokens": sum(r[1] for r in rows),
            "mean_ttft_s": sum(r[0] for r in rows) / len(rows), "max_prompt": max(r[2] for r in rows),
            "ram_bytes": usage.get("ram_bytes", 0), "disk_bytes": usage.get("disk_bytes", 0),
            "replies": replies}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    _, tok = load("demo")
    pool = _text_pool()
    system = _take(pool, 0, 2000, tok)
    inputs = {k: [{"role": "tool", "content": _take(pool, 40 + 7 * (k * TURNS + t), 120, tok)} if t % 2
                  else {"role": "user", "content": f"Task {k}.{t}: " + _take(pool, 90 + 5 * (k * TURNS + t), 50, tok)}
                  for t in range(TURNS)] for k in range(CONVS)}
    work = Path(tempfile.mkdtemp(prefix="bench-prefix-cache-"))
    modes = [("no reuse", ["--cache-ram", "0"]), ("single session", ["--cache-ram", "0"]),
             ("RAM cache", ["--cache-ram", "4GB"]),
             ("disk, restart", ["--cache-ram", "4GB", "--cache-disk", "16GB", "--cache-dir", str(work / "kv")])]
    results = []
    for mode, flags in modes:
        r = run_mode(mode, flags, tok, system, inputs, work / "home")
        results.append(r)
        print(f"{mode}: done", file=sys.stderr)
    base = results[0]
    print(f"\n{CONVS} conversations x {TURNS} turns, shared system prompt ~2000 tokens, replies {REPLY} tokens; "
          f"longest prompt {base['max_prompt']} tokens (demo context 4096)\n")
    print("| mode | prompt tokens | prefill tokens | prefill cut vs no reuse | mean TTFT | RAM bytes | disk bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['prompt_tokens']:,} | {r['prefill_tokens']:,} | "
              f"{base['prefill_tokens'] / max(r['prefill_tokens'], 1):.1f}x | {r['mean_ttft_s'] * 1000:.0f} ms | "
              f"{r['ram_bytes'] / 1e6:.1f} MB | {r['disk_bytes'] / 1e6:.1f} MB |")
    same = all(r["replies"] == base["replies"] for r in results)
    print(f"\nreplies identical in every mode: {same}")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "replies"} for r in results], indent=1))


if __name__ == "__main__":
    main()
