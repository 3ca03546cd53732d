"""`step35-mlx bench` run for real as a subprocess: the demo (plain + MTP) and mlx-lm on a synthetic 4-bit checkpoint."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx

from step35_mlx.bench_checkpoint import BenchShape, bench_config, write_checkpoint
from step35_mlx.hub import DEMO_DIR

from clirun import run_cli


def _bench(home: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(["bench", *args], home, timeout=300)


def test_bench_demo_plain_and_mtp_json(tmp_path):
    streams = 2 if mx.default_device() == mx.cpu else 1  # the MoE decode split over two CPU streams
    r = _bench(tmp_path, "--model", "demo", "-p", "16", "-n", "6", "--depth", "0,24", "-r", "1", "--mtp", "2", "--json",
               "--streams", str(streams))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["settings"]["streams"] == streams
    assert out["machine"]["mlx_version"] and out["machine"]["cores"] >= 1
    rows = out["rows"]
    assert [(x["engine"], x["depth"]) for x in rows] == [("ours", 0), ("ours", 24), ("ours mtp d=2", 0),
                                                        ("ours mtp d=2", 24)]
    for x in rows:
        assert x["pp_tps"] > 0 and x["tg_tps"] > 0 and x["peak_gb"] > 0
    for x in rows[2:]:
        assert len(x["acceptance"]) == 2 and all(0 <= a <= 1 for a in x["acceptance"])
        assert 1.0 <= x["tokens_per_verify"] <= 3.0
    assert out["ratios"] == [] and out["floor_tps"] > 0


def test_bench_vs_mlx_lm_on_a_synthetic_4bit_checkpoint(tmp_path):
    ckpt = tmp_path / "q4"
    write_checkpoint(ckpt, bench_config(BenchShape(hidden=128, layers=4, experts=8, top_k=2, vocab=2048, window=16)), 0)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_DIR / name, ckpt / name)
    r = _bench(tmp_path / "home", "--model", str(ckpt), "-p", "20", "-n", "4", "--depth", "0,24", "-r", "1", "--vs-mlx-lm", "--streams", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "MLX " in lines[0]
    engines = [l.split()[0] for l in lines if re.match(r"^(ours|mlx-lm) +\d", l)]
    assert engines == ["ours", "ours", "mlx-lm", "mlx-lm"]
    assert any(l.startswith("compute floor") for l in lines)
    ratio_rows = lines[lines.index(next(l for l in lines if l.startswith("ours / mlx-lm"))) + 1:]
    assert len(ratio_rows) == 2
    for row in ratio_rows:
        depth, pp, tg, peak = row.split()
        assert depth in ("0", "24") and float(pp[:-1]) > 0 and float(tg[:-1]) > 0 and float(peak[:-1]) > 0


def test_bench_bad_depth_is_one_red_line(tmp_path):
    r = _bench(tmp_path, "--model", "demo", "--depth", "0,abc", "-r", "1")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "--depth" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
