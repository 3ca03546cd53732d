"""Tensor, expert and pipeline parallelism on 2 and 3 ring-backend ranks on loopback.

One spawn per rank count runs every case (the MLX import dominates a rank's cost); each
rank writes what it computed, the test compares it with the single-process model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn
import numpy as np
import pytest

from step35_mlx import Model, load_model
from step35_mlx.config import ModelConfig
from step35_mlx.convert import quantize as conv
from step35_mlx.convert.dryrun import step3p5_flash_config
from step35_mlx.distributed import (Layout, check_tensor_split, expert_range, parse_split, rank_bytes, split_layers,
                                    tensor_rank_counts)
from step35_mlx.distributed.pipeline import split_by_memory
from step35_mlx.distributed.launch import spawn_local
from step35_mlx.distributed.loading import tensor_index, tensor_sizes
from step35_mlx.distributed.probe import probe
from step35_mlx.distributed.subset import write_rank_subset
from step35_mlx.quant.recipes import uniform
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

from conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 3, 99, 42, 7, 200, 13, 64, 8, 150, 31, 77, 2, 90, 11]
CONFIG = dict(hidden_size=64, num_layers=6, head_dim=32, intermediate_size=128, moe_intermediate_size=64,
              share_expert_dim=64, sliding_window=6)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_hf_checkpoint(root / "f32", tiny_config(**CONFIG), seed=11)
    conv.convert_checkpoint(root / "f32", root / "q4", recipe=uniform(4, 32), progress=False)
    return root


def _run(root: Path, ranks: int, cases: list[dict]) -> Path:
    out = root / f"out{ranks}"
    out.mkdir()
    spec = root / f"spec{ranks}.json"
    spec.write_text(json.dumps({"out": str(out), "prompt": PROMPT, "cases": cases}))
    results = spawn_local(ranks, ["-m", "step35_mlx.distributed.probe", str(spec)], root,
                          env={"PYTHONPATH": str(ROOT)}, timeout=240)
    for r in results:  # mlx.launch would exit 0 even when a rank fails: check each one
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return out


def _reference(path: Path) -> dict:
    return probe(load_model(path), PROMPT)


def _check_case(out: Path, name: str, ranks: int, ref: dict, layout: Layout, path: Path) -> None:
    sizes = tensor_sizes(tensor_index(path, ModelConfig.from_file(path)))
    got = [dict(np.load(out / f"{name}.r{r}.npz")) for r in range(ranks)]
    for r, res in enumerate(got):
        for key in ("logits", "cached", "mtp0", "mtp1", "mtp2"):
            assert rel_err(res[key], ref[key]) <= 1e-4, (name, r, key, rel_err(res[key], ref[key]))
        for key in ("greedy", "greedy_mtp"):
            assert res[key].tolist() == ref[key].tolist(), (name, r, key)
        for key in ("sampled", "sampled_mtp"):  # rank 0 samples; every rank must hold the same tokens
            assert res[key].tolist() == got[0][key].tolist(), (name, r, key)
        assert int(res["bytes"]) == rank_bytes(sizes, layout, r, load_itemsize=4), (name, r)
    total = sum(int(res["bytes"]) for res in got)
    assert int(got[0]["bytes"]) < int(ref["bytes"]) < total or layout.mode == "tensor"
    # Seeded sampling matches the single process too (same logits, same keys).
    assert got[0]["sampled"].tolist() == ref["sampled"].tolist()


def test_two_ranks_every_mode_float_and_4bit(checkpoints):
    root = checkpoints
    cases = [{"name": f"{mode}-{kind}", "path": str(root / kind), "mode": mode, "split": split}
             for kind in ("f32", "q4") for mode, split in (("tensor", None), ("expert", None), ("pipeline", [4, 2]))]
    # per-rank copies (split-model): each rank loads from a folder holding only its share
    for mode, split in (("tensor", None), ("pipeline", [4, 2])):
        for r in range(2):
            res = write_rank_subset(root / "q4", root / f"part-{mode}" / f"rank{r}", mode, 2, r, split=split)
            assert res.nbytes < sum(f.stat().st_size for f in (root / "q4").glob("*.safetensors"))
        cases.append({"name": f"part-{mode}", "path": str(root / f"part-{mode}") + "/rank{rank}", "mode": mode,
                      "split": split})
    cases.append({"name": "wrong-part", "path": str(root / "part-tensor" / "rank0"), "mode": "tensor"})
    for mode, split in (("tensor", None), ("expert", None), ("pipeline", [2, 4])):  # Model.shard on a loaded model
        cases.append({"name": f"mem-{mode}", "path": str(root / "f32"), "mode": mode, "split": split, "in_memory": True})
    out = _run(root, 2, cases)
    msg = (out / "wrong-part.r1.err").read_text()
    assert msg == "this folder is the copy for rank 0 of 2 with --parallel tensor; this is rank 1 of 2 with --parallel tensor"
    for kind in ("f32", "q4"):
        ref = _reference(root / kind)
        for mode, layout in (("tensor", Layout("tensor", 2)), ("expert", Layout("expert", 2, 8)),
                             ("pipeline", Layout("pipeline", 2, 8, (4, 2)))):
            _check_case(out, f"{mode}-{kind}", 2, ref, layout, root / kind)
            if kind == "q4" and mode != "expert":
                _check_case(out, f"part-{mode}", 2, ref, layout, root / kind)
            if kind == "f32":
                mem = layout if mode != "pipeline" else Layout("pipeline", 2, 8, (2, 4))
                _check_case(out, f"mem-{mode}", 2, ref, mem, root / kind)
    q4 = _reference(root / "q4")
    assert rel_err(q4["logits"], _reference(root / "f32")["logits"]) > 1e-3  # the 4-bit case is really quantized


def test_three_ranks_uneven_experts_and_stages(checkpoints):
    root = checkpoints
    cases = [{"name": "expert", "path": str(root / "f32"), "mode": "expert"},
             {"name": "pipeline", "path": str(root / "f32"), "mode": "pipeline", "split": [1, 3, 2]},
             {"name": "tensor", "path": str(root / "f32"), "mode": "tensor"}]
    out = _run(root, 3, cases)
    ref = _reference(root / "f32")
    _check_case(out, "expert", 3, ref, Layout("expert", 3, 8), root / "f32")
    _check_case(out, "pipeline", 3, ref, Layout("pipeline", 3, 8, (1, 3, 2)), root / "f32")
    for r in range(3):  # 4 full-attention heads cannot be split 3 ways: every rank refuses, none hangs
        msg = (out / f"tensor.r{r}.err").read_text()
        assert "4 attention heads do not divide by 3" in msg and "tensor parallelism works with 2 ranks;" in msg, msg


def _release_q4() -> Model:
    """The release's module tree, lazily built (no weight is drawn) and quantized like `convert --recipe q4`."""
    model = Model(ModelConfig.from_dict(step3p5_flash_config()))
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("moe.gate"))
    return model


def test_release_tensor_split_limits():
    model = _release_q4()
    with pytest.raises(ValueError) as e:
        check_tensor_split(model, 8)
    msg = str(e.value)
    assert "width 1280 / 8 ranks = 160 is not a multiple of the quantization group 64" in msg
    assert "tensor parallelism works with 2, 4 ranks" in msg and "--parallel expert" in msg
    assert tensor_rank_counts(model) == [2, 4]
    check_tensor_split(model, 4)


def test_split_arithmetic():
    assert split_layers(45, [128, 64]) == [30, 15]
    assert split_layers(45, [1, 1]) == [23, 22]
    assert split_layers(6, [100, 1, 1]) == [4, 1, 1]
    assert parse_split("30,15", 45, 2) == [30, 15]
    assert split_by_memory([10] * 6, [2e9, 1e9]) == [4, 2]
    assert split_by_memory([1, 1, 10, 10], [1e9, 1e9]) == [3, 1]  # cheap dense layers go together
    assert split_by_memory([5] * 6, [3e9, 2e9], shared=1e9) == [4, 2]  # room 2 : 1 once the shared part is held
    for bad, why in (("30,14", "sum to 45"), ("45", "1 stages but there are 2"), ("a,b", "comma-separated")):
        with pytest.raises(ValueError, match=why):
            parse_split(bad, 45, 2)
    assert [len(expert_range(288, 5, r)) for r in range(5)] == [58, 58, 58, 57, 57]
    assert expert_range(288, 5, 4) == range(231, 288)
    sizes = {"model.layers.3.moe.up_proj.weight": ((288, 1280, 4096), 2, True),
             "model.layers.3.self_attn.q_proj.weight": ((8192, 4096), 2, True),
             "model.layers.3.input_layernorm.weight": ((4096,), 2, True)}
    assert rank_bytes(sizes, Layout("expert", 5, 288), 4) == 57 * 1280 * 4096 * 2 + 8192 * 4096 * 2 + 4096 * 4
    assert rank_bytes(sizes, Layout("tensor", 2), 1) == (288 * 1280 * 4096 + 8192 * 4096) + 4096 * 4
    assert rank_bytes(sizes, Layout("pipeline", 2, counts=(3, 42)), 0) == 0


def test_plan_hosts_command_and_its_arithmetic():
    from typer.testing import CliRunner

    from step35_mlx.cli import app
    from step35_mlx.distributed.hostplan import recipe_tensor_sizes
    from step35_mlx.plan import weight_sizes
    from step35_mlx.quant.recipes import get_recipe

    cfg = ModelConfig.from_dict(step3p5_flash_config())
    sizes = recipe_tensor_sizes(cfg, get_recipe("q4"))
    # one rank holds what the single-Mac planner counts (router and norms upcast to float32 included);
    # two pipeline stages hold it all once, plus the shared tensors twice
    single = weight_sizes(cfg, "q4")
    assert rank_bytes(sizes, Layout("tensor", 1), 0) == single.trunk + single.mtp
    whole = rank_bytes(sizes, Layout("tensor", 1), 0)
    stage = [rank_bytes(sizes, Layout("pipeline", 2, counts=(24, 21)), r) for r in range(2)]
    shared = sum(n for n in (rank_bytes({k: v}, Layout("tensor", 1), 0) for k, v in sizes.items()
                             if not k.startswith("model.layers.")))
    assert sum(stage) == whole + shared
    # the KV cache: split by heads (tensor), by layers (pipeline; the MTP caches on every rank), whole (expert)
    from step35_mlx.distributed.hostplan import rank_context, rank_kv, rank_memory
    from step35_mlx.plan import plan_memory

    plan = plan_memory(cfg, recipe="q4", context=65536)
    assert sum(rank_kv(cfg, Layout("tensor", 2), r, plan) for r in range(2)) == plan.kv
    pipe = [rank_kv(cfg, Layout("pipeline", 3, counts=(15, 15, 15)), r, plan) for r in range(3)]
    assert abs(sum(pipe) - (plan.kv + 2 * plan.mtp_kv)) <= 3 and pipe[0] > plan.mtp_kv
    assert rank_kv(cfg, Layout("expert", 2, 288), 1, plan) == plan.kv
    tp = Layout("tensor", 2)
    ctx = rank_context(cfg, tp, 0, int(57e9), 56 * 2**30, mtp=True)
    assert rank_memory(cfg, tp, 0, int(57e9), ctx, mtp=True) <= 56 * 2**30 < rank_memory(cfg, tp, 0, int(57e9),
                                                                                         ctx + 256, mtp=True)
    assert rank_context(cfg, tp, 0, int(70e9), 56 * 2**30, mtp=True) == 0
    r = CliRunner().invoke(app, ["plan", "--hosts", "128GB,64GB", "--recipe", "q4"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("2 Macs: 128 GB, 64 GB; context 32,768 tokens")
    assert any(l.split() == ["q4", "pipeline", "80.7", "37.8", "fits", "split", "32,13"] for l in lines), r.stdout
    assert any(l.split() == ["q4", "expert", "61.8", "61.8!", "does", "not", "fit"] for l in lines), r.stdout
    assert ("mlx.launch --hostfile hosts.json --backend ring -- step35-mlx chat --model ~/models/step35-q4 "
            "--parallel pipeline --split 32,13") in r.stdout
    r = CliRunner().invoke(app, ["plan", "--hosts", "2x64GB", "--recipe", "q4"])
    assert any(l.split() == ["q4", "tensor", "59.2*", "59.2*", "fits"] for l in r.stdout.splitlines()), r.stdout
    r = CliRunner().invoke(app, ["plan", "--hosts", "64GB"])
    assert r.exit_code == 2 and "error: --hosts '64GB': name at least two Macs (e.g. 2x64GB)" in r.output
