"""What one rank computes for the distributed checks (tests and ``benchmarks/bench_distributed.py``).

``python -m step35_mlx.distributed.probe SPEC.json`` under ``MLX_HOSTFILE``/``MLX_RANK`` loads each
case of the spec with ``load_distributed`` and writes ``{out}/{name}.r{rank}.npz``: parameter bytes,
uncached logits, chunked-prefill + cached-decode logits, teacher-forced MTP logits, and generated
tokens (greedy, greedy MTP, seeded sampling plain and MTP). The same function runs single-process
for the reference.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import socket
import struct
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..decode import ar_tokens
from ..sampling import SamplingParams
from ..speculative import speculative_tokens
from ..loader import load_model
from .loading import load_distributed, param_bytes


def _take(gen, n: int) -> list[int]:
    out = list(itertools.islice(gen, n))
    gen.close()
    return out


def probe(model, prompt: list[int], n_tokens: int = 10, chunk: int = 5, seed: int = 3) -> dict[str, np.ndarray]:
    """Every quantity the distributed checks compare, computed on ``model``."""
    toks = mx.array([prompt], dtype=mx.int32)
    res: dict[str, np.ndarray] = {"bytes": np.array(param_bytes(model))}
    res["logits"] = np.array(model(toks))
    cache = model.make_cache()
    res["cached"] = np.array(mx.concatenate([model(toks[:, i:i + chunk], cache) for i in range(0, toks.shape[1], chunk)], 1))
    if model.num_mtp:
        for k, lg in enumerate(model.mtp_logits(toks, model.forward_hidden(toks))):
            res[f"mtp{k}"] = np.array(lg)
    greedy, sampled = SamplingParams(temperature=0), SamplingParams(temperature=1.0)
    t0 = time.perf_counter()
    res["greedy"] = np.array(_take(ar_tokens(model, model.make_cache(), toks[0], greedy), n_tokens))
    res["greedy_s"] = np.array(time.perf_counter() - t0)
    res["sampled"] = np.array(_take(ar_tokens(model, model.make_cache(), toks[0], sampled, key=mx.random.key(seed)), n_tokens))
    if model.num_mtp >= 2:
        res["greedy_mtp"] = np.array(_take(speculative_tokens(model, model.make_cache(), toks[0], greedy, depth=2), n_tokens))
        res["sampled_mtp"] = np.array(_take(speculative_tokens(model, model.make_cache(), toks[0], sampled, depth=2,
                                                               key=mx.random.key(seed)), n_tokens))
    return res


def tcp_bytes_sent() -> int | None:
    """Bytes this process's TCP sockets have had acknowledged (Linux ``TCP_INFO``); ``None`` elsewhere."""
    if sys.platform != "linux":
        return None
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as s:
                if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            continue
        if len(info) >= 128:
            total += struct.unpack_from("Q", info, 120)[0]  # tcpi_bytes_acked
    return total


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux: ``VmHWM``, which unlike ``ru_maxrss``
    does not start from the parent's peak after fork + exec)."""
    if sys.platform == "linux":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def decode_bytes(model, prompt: list[int], short: int = 4, long: int = 12) -> float:
    """TCP bytes sent per decoded token: the difference between a long and a short greedy run."""
    toks = mx.array(prompt, dtype=mx.int32)
    sent = []
    for n in (short, long):
        before = tcp_bytes_sent()
        _take(ar_tokens(model, model.make_cache(), toks, SamplingParams(temperature=0)), n)
        mx.synchronize()
        sent.append(tcp_bytes_sent() - before)
    return (sent[1] - sent[0]) / (long - short)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    base = peak_rss()
    if spec.get("single"):  # the one-process reference of the benchmark
        res = probe(load_model(spec["cases"][0]["path"]), spec["prompt"])
        res["peak_rss"], res["base_rss"] = np.array(peak_rss()), np.array(base)
        np.savez(out / "single.npz", **res)
        return
    group = mx.distributed.init(strict=True, backend="ring")
    for case in spec["cases"]:
        model = None
        try:
            path = case["path"].format(rank=group.rank())  # "{rank}": a per-rank copy (split-model)
            if case.get("in_memory"):  # the whole model loaded, then Model.shard
                model = load_model(path).shard(group, case["mode"], case.get("split"))
            else:
                model = load_distributed(path, case["mode"], group, split=case.get("split"))
        except ValueError as e:
            (out / f"{case['name']}.r{group.rank()}.err").write_text(str(e))
        failed = mx.distributed.all_sum(mx.array([int(model is None)]), group=group).item()
        if failed:  # a rank that could not load: every rank skips the case
            continue
        res = probe(model, spec["prompt"])
        res["peak_rss"], res["base_rss"] = np.array(peak_rss()), np.array(base)
        if spec.get("measure_bytes"):
            res["decode_bytes"] = np.array(decode_bytes(model, spec["prompt"]))
        np.savez(out / f"{case['name']}.r{group.rank()}.npz", **res)


if __name__ == "__main__":
    main(sys.argv[1])
