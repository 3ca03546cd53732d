"""Hostfiles for MLX's ring backend and local multi-rank runs on loopback.

MLX's ring backend reads ``MLX_HOSTFILE`` (a JSON list with one list of ``"ip:port"``
addresses per rank) and ``MLX_RANK``. ``mlx.launch`` writes both for you across Macs;
``spawn_local`` does the same on one machine (tests, benchmarks) and, unlike
``mlx.launch``, reports every rank's own exit status.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ring_hostfile(addresses: list[str]) -> list[list[str]]:
    """The ring backend's hostfile content: one ``["ip:port"]`` entry per rank."""
    return [[a] for a in addresses]


def write_local_hostfile(path: Path, ranks: int) -> Path:
    """A ring hostfile for ``ranks`` ranks on 127.0.0.1, on free ports."""
    path.write_text(json.dumps(ring_hostfile([f"127.0.0.1:{p}" for p in free_ports(ranks)])))
    return path


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def start_local(ranks: int, argv: list[str], workdir: Path, *,
                env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start ``python argv...`` as ``ranks`` ring-backend ranks on loopback (stdin, stdout, stderr piped)."""
    hostfile = write_local_hostfile(workdir / "hosts.json", ranks)
    procs = []
    for r in range(ranks):
        e = dict(os.environ, **(env or {}), MLX_HOSTFILE=str(hostfile), MLX_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def spawn_local(ranks: int, argv: list[str], workdir: Path, *, timeout: float = 300,
                env: dict[str, str] | None = None) -> list[RankResult]:
    """Run ``python argv...`` as ``ranks`` ranks on loopback until they end; every rank's status and output."""
    return wait_all(start_local(ranks, argv, workdir, env=env), timeout)


def wait_all(procs: list[subprocess.Popen], timeout: float, stdin: str = "") -> list[RankResult]:
    """Each rank's exit status and output (all are killed if one outlives ``timeout``); rank 0 reads ``stdin``."""
    for i, p in enumerate(procs):
        if p.stdin is not None:
            if i == 0 and stdin:
                p.stdin.write(stdin)
            p.stdin.close()
            p.stdin = None  # communicate() must not touch the closed pipe
    results = []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
            err += f"\nrank {r} timed out after {timeout} s"
        results.append(RankResult(r, p.returncode, out, err))
    return results
