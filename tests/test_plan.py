"""Memory planner: spec arithmetic for the release, measured caches on a tiny model, verdicts,
the fit check's options, the max-context search and the ``plan`` command."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from step35_mlx import plan as P
from step35_mlx.plan import load_check, machine as machine_mod
from step35_mlx.cli import app
from step35_mlx.data import release_config
from step35_mlx.loader import load_model
from step35_mlx.quant.recipes import RECIPES, plan_sizes
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

from conftest import tokens_for

runner = CliRunner()
CTX = 262144


@pytest.fixture(scope="module")
def release():
    return release_config()


# ----------------------------------------------------------------------------- spec §7 arithmetic


def test_release_numbers_match_spec(release):
    p = P.plan_memory(release, recipe="q4", context=CTX)
    # 12 full layers x K+V x 8 kv heads x 128 x bf16
    assert p.full_kv_per_token == 12 * 2 * 8 * 128 * 2 == 49_152
    assert p.full_kv == 49_152 * CTX == 12 * P.GiB  # "256K 12.0 GiB per sequence"
    assert P.plan_memory(release, context=4096).full_kv == 49_152 * 4096
    # KVCache allocates in steps of 256 positions
    assert P.plan_memory(release, context=4097).full_kv == 49_152 * (4096 + 256)
    # Sliding: spec counts 33 x 512 x 4096 = 66 MiB; our rings hold window + slack = 520 slots.
    assert p.sliding_kv == 33 * 520 * 4096
    assert P.plan_memory(release, context=CTX, slack=0).sliding_kv == 33 * 512 * 4096 == 66 * P.MiB
    assert P.plan_memory(release, context=10).sliding_kv == p.sliding_kv  # fixed, whatever the context
    assert p.mtp_kv == 3 * 520 * 4096
    # Weights: plan_sizes plus the float32 copies of the bf16 routers and norms.
    sizes = plan_sizes(release, RECIPES["q4"])
    w = p.weights_source
    assert p.weights + p.mtp_weights - w.upcast == sizes["total"]
    assert abs((p.weights - w.upcast) / 1e9 - 110.8) <= 0.2
    router = 42 * 288 * 4096 * 2
    assert router <= w.upcast < router + 2 * 10**6
    off = P.plan_memory(release, context=CTX, mtp=False)
    assert off.mtp_weights == 0 and off.mtp_kv == 0 and off.weights == p.weights
    # Quantized KV: packed bits + a bf16 scale and bias per 64 elements.
    assert P.plan_memory(release, context=CTX, kv_bits=8).full_kv_per_token == 12 * 2 * 8 * (128 + 8) == 26_112
    assert P.plan_memory(release, context=CTX, kv_bits=4).full_kv_per_token == 12 * 2 * 8 * (64 + 8) == 13_824
    assert p.total == (p.weights + p.mtp_weights + p.full_kv + p.sliding_kv + p.mtp_kv + p.activations
                       + p.overhead)
    # Prefill activations with the fused kernel: no scores; the largest transient is the
    # old buffer of one full layer while its cache grows (4096 B/token).
    assert p.activation_detail["scores"] == 0
    assert p.activation_detail["kv_growth"] == 4096 * (CTX - 512)
    assert p.activations < 1.2 * P.GB


def test_quantized_attention_scores_and_dequantize_handshake(release, monkeypatch):
    from step35_mlx.layers import attention

    monkeypatch.delattr(attention, "DEQUANTIZE_PREFILL_ROWS", raising=False)
    q = P.plan_memory(release, context=CTX, kv_bits=8)
    # our quantized attention materialises heads x rows x keys scores (bf16 + a float32 copy)
    assert q.activation_detail["scores"] == 64 * 512 * CTX * (2 + 4)
    monkeypatch.setattr(attention, "DEQUANTIZE_PREFILL_ROWS", 16, raising=False)
    d = P.plan_memory(release, context=CTX, kv_bits=8)
    assert d.activation_detail["scores"] == 0 and d.activation_detail["dequantized_kv"] == 2 * 8 * 128 * CTX * 2
    assert d.total < P.plan_memory(release, context=CTX).total  # now 8-bit KV saves memory
    # decode / verify rows still use the quantized path: scores of 4 rows
    v = P.activation_bytes(q.config, CTX, prefill_step=1, kv_bits=8, mtp=True)
    assert v["scores"] == 64 * 4 * CTX * 6 and v["phase"] == "verify"


# ----------------------------------------------------------------------------- measured caches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config(num_layers=4, full_layers={0, 3}, sliding_window=8, head_dim=64, hidden_size=128)
    path = tmp_path_factory.mktemp("plan") / "ckpt"
    write_hf_checkpoint(path, cfg, seed=3)
    return path, cfg, load_model(path, dtype=mx.float32)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_kv_prediction_equals_measured_cache_bytes(tiny, bits):
    _, cfg, m = tiny
    toks = tokens_for(cfg["vocab_size"], 700, seed=4)
    cache = m.make_cache(kv_bits=bits)
    mtp_cache = m.make_mtp_cache(kv_bits=bits)
    done = 0
    for n in (40, 256, 300, 700):  # not all multiples of 256: the cache rounds up, so does the plan
        while done < n:
            step = min(64, n - done)
            m(toks[:, done:done + step], cache=cache)
            done += step
        h = m.forward_hidden(toks[:, :3])
        for k, c in enumerate(mtp_cache):
            m.mtp_step(k, toks[:, k + 1:k + 2], h[:, :1], c)
        mx.eval([[c.keys, c.values] for c in cache + mtp_cache])
        p = P.plan_memory(cfg, recipe="bf16", context=n, kv_bits=bits, activation_dtype_bytes=4)
        full = sum(c.nbytes for c, l in zip(cache, m.layers) if not l.is_sliding)
        sliding = sum(c.nbytes for c, l in zip(cache, m.layers) if l.is_sliding)
        assert (full, sliding, sum(c.nbytes for c in mtp_cache)) == (p.full_kv, p.sliding_kv, p.mtp_kv)


def test_folder_sizes_match_quantization_block_and_recipe(tmp_path):
    from step35_mlx.config import ModelConfig
    from step35_mlx.convert.quantize import convert_checkpoint

    for dtype, source_dtype, act in (("float32", "F32", 4), ("bfloat16", "BF16", 2)):
        src = tmp_path / f"src-{dtype}"
        write_hf_checkpoint(src, tiny_config(moe_intermediate_size=64, share_expert_dim=64, head_dim=64,
                                             hidden_size=128), num_shards=2, dtype=dtype)
        out = tmp_path / f"q3-{dtype}"
        convert_checkpoint(src, out, recipe="q3-mixed", progress=False)
        measured = P.folder_weight_sizes(out)
        cfg = ModelConfig.from_file(out)
        block = P.weight_sizes(cfg, cfg.raw["quantization"], source_dtype=source_dtype)
        recipe = P.weight_sizes(cfg, "q3-mixed", source_dtype=source_dtype)
        assert (measured.trunk, measured.mtp) == (block.trunk, block.mtp) == (recipe.trunk, recipe.mtp)
        assert measured.upcast == recipe.upcast and (measured.upcast > 0) == (dtype == "bfloat16")
        assert measured.recipe == "q3-mixed" and measured.measured
        assert P.folder_activation_bytes(out) == act
        # what the loaded model really holds: the files plus the float32 norms and routers,
        # or everything float cast to the load dtype
        from step35_mlx.costs import nbytes

        assert nbytes(load_model(out, dtype=mx.float32)) == P.folder_weight_sizes(out, 4).total(True)
        if dtype == "bfloat16":
            assert nbytes(load_model(out, dtype=mx.bfloat16)) == measured.total(True)
        float_sizes = P.folder_weight_sizes(src)
        assert float_sizes.recipe == "float" and float_sizes.trunk > measured.trunk


# ----------------------------------------------------------------------------- machines and verdicts


def test_mac_rule_and_verdicts():
    assert P.mac_machine(16).gpu_limit == 16 * P.GiB * 2 // 3  # 10,922.67 MiB, as Metal reports
    assert P.mac_machine(32).gpu_limit == 32 * P.GiB * 2 // 3
    assert P.mac_machine(36).gpu_limit == 27 * P.GiB
    assert P.mac_machine(128).gpu_limit == 96 * P.GiB
    assert P.mac_machine(128, wired_limit_mb=114688).gpu_limit == 112 * P.GiB
    assert P.mac_machine(128, recommended=int(107.52 * P.GiB)).gpu_limit == int(107.52 * P.GiB)
    mac = P.mac_machine(128)
    assert P.sysctl_command(mac) == "sudo sysctl iogpu.wired_limit_mb=122880"
    assert P.sysctl_command(P.mac_machine(64)) == "sudo sysctl iogpu.wired_limit_mb=57344"
    assert P.verdict(96 * P.GiB, mac).status == "fits"
    v = P.verdict(96 * P.GiB + 1, mac)
    assert v.status == "raise" and v.command.endswith("=122880") and v.raised_limit == 120 * P.GiB
    assert P.verdict(120 * P.GiB + 1, mac).status == "no"
    # a small Mac where RAM - 8 GiB is below the default: raising cannot help
    assert P.verdict(11 * P.GiB, P.mac_machine(16)).status == "no"
    linux = P.linux_machine("MemTotal:       32000000 kB\nMemFree: 1 kB\nMemAvailable:   20000000 kB\n")
    assert (linux.total, linux.gpu_limit, linux.kind) == (32000000 * 1024, 20000000 * 1024, "linux")
    assert P.verdict(linux.gpu_limit + 1, linux).status == "no"  # no sysctl off macOS
    cuda = P.linux_machine("MemTotal: 1 kB\n", cuda={"total_memory": 141 * P.GB, "free_memory": 139 * P.GB})
    assert (cuda.kind, cuda.total, cuda.gpu_limit) == ("cuda", 141 * P.GB, 139 * P.GB)
    here = P.machine_memory()
    assert here.total > 0 and 0 < here.gpu_limit <= max(here.total, here.gpu_limit)


def test_set_wired_limit_is_capped_and_mac_only(monkeypatch):
    assert sys.platform == "darwin" or P.set_wired_limit(10 * P.GiB) is None
    calls = []
    monkeypatch.setattr(machine_mod.sys, "platform", "darwin")
    monkeypatch.setattr(machine_mod, "_metal_available", lambda: True)
    monkeypatch.setattr(machine_mod, "_device_info", lambda: {"max_recommended_working_set_size": 96 * P.GiB})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    P.set_wired_limit(120 * P.GiB)
    P.set_wired_limit(50 * P.GiB)
    assert calls == [96 * P.GiB, 50 * P.GiB]


# ----------------------------------------------------------------------------- max context


def test_max_context_is_monotonic_and_exact(release):
    base = P.plan_memory(release, recipe="q3-mixed", context=CTX)
    needs = [base.replan(context=c).total for c in (1, 100, 255, 256, 257, 4096, 50_000, CTX)]
    assert needs == sorted(needs)
    last = 0
    for gb in (80, 92, 95, 97, 100, 103.08, 110):
        limit = int(gb * P.GB)
        m = P.max_context(base, limit)
        assert m >= last
        last = m
        if m == 0:
            assert base.replan(context=1).total > limit
        elif m < CTX:
            assert base.replan(context=m).total <= limit < base.replan(context=m + 1).total
        else:
            assert base.replan(context=CTX).total <= limit
    assert P.max_context(base, 10**15) == CTX


# ----------------------------------------------------------------------------- check_fit


def _assert_options_fit(plan, machine, options):
    assert options
    for o in options:
        p = plan.replan(**o.changes)
        assert p.total <= (o.limit or machine.gpu_limit), o


def test_check_fit_refuses_with_verified_options(release):
    plan = P.plan_memory(release, recipe="q4", context=CTX)
    P.check_fit(plan, P.mac_machine(192))  # fits: returns
    mac = P.mac_machine(128)
    with pytest.raises(P.InsufficientMemoryError) as e:
        P.check_fit(plan, mac)
    msg = str(e.value)
    assert "needs 127.5 GB" in msg and "103.1 GB" in msg
    assert "step35-mlx convert --recipe q2-mixed" in msg
    assert "sudo sysctl iogpu.wired_limit_mb=122880" in msg
    flags = [o.flag for o in e.value.options]
    assert any(f.startswith("--recipe q3-mixed --max-context ") for f in flags)
    assert isinstance(e.value, ValueError)
    _assert_options_fit(plan, mac, e.value.options)


def test_check_fit_options_each_fit_on_simulated_machines(release, monkeypatch):
    from step35_mlx.layers import attention

    monkeypatch.setattr(attention, "DEQUANTIZE_PREFILL_ROWS", 16, raising=False)
    plan = P.plan_memory(release, recipe="q2-mixed", context=CTX)
    seen = set()
    for short in (0.1, 0.5, 1.5, 4, 8, 12):
        machine = P.MachineMemory(plan.total, plan.total - int(short * P.GB), "test", "linux", "box")
        with pytest.raises(P.InsufficientMemoryError) as e:
            P.check_fit(plan, machine)
        _assert_options_fit(plan, machine, e.value.options)
        seen |= {o.flag.split()[0] for o in e.value.options}
    assert {"--max-context", "--kv-bits", "--no-mtp"} <= seen
    # prefill chunks: quantized KV without the handshake is dominated by attention scores
    monkeypatch.delattr(attention, "DEQUANTIZE_PREFILL_ROWS")
    q = P.plan_memory(release, recipe="q2-mixed", context=32768, kv_bits=4)
    machine = P.MachineMemory(q.total, q.total - 2 * P.GB, "test", "linux", "box")
    with pytest.raises(P.InsufficientMemoryError) as e:
        P.check_fit(q, machine)
    assert any(o.flag.startswith("--prefill-step") for o in e.value.options)
    _assert_options_fit(q, machine, e.value.options)
    with pytest.raises(P.InsufficientMemoryError, match="Nothing fits"):
        P.check_fit(plan, P.MachineMemory(40 * P.GB, 40 * P.GB, "test", "linux", "box"))


def test_preflight_picks_context_and_refuses_small_machines(tiny, monkeypatch):
    path, cfg, _ = tiny
    wired = []
    monkeypatch.setattr(load_check, "set_wired_limit", lambda n: wired.append(n))
    big = P.MachineMemory(64 * P.GiB, 32 * P.GiB, "test", "mac", "big Mac")
    p = P.preflight(path, machine=big)
    assert p.context == cfg["max_position_embeddings"] and wired == [p.total]
    assert p.weights + p.mtp_weights == P.folder_weight_sizes(path).total(True)
    assert P.preflight(path, context=1000, kv_bits=8, machine=big, wire=False).context == 1000
    # a machine just big enough for 2,000 tokens: the automatic limit is exact
    need = P.preflight(path, context=2000, machine=big, wire=False).total
    small = P.MachineMemory(need, need, "test", "linux", "box")
    assert P.preflight(path, machine=small, min_context=1000, wire=False).context == 2000
    with pytest.raises(P.InsufficientMemoryError, match="--max-context 2000"):
        P.preflight(path, context=3000, machine=small, wire=False)
    with pytest.raises(P.InsufficientMemoryError):
        P.preflight(path, machine=small, wire=False)  # min_context 4096 does not fit
    with pytest.raises(ValueError, match="larger than the model's"):
        P.preflight(path, context=10**7, machine=big)
    with pytest.raises(ValueError, match="kv_bits must be 4 or 8"):
        P.preflight(path, kv_bits=3, machine=big)


# ----------------------------------------------------------------------------- CLI


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


def test_cli_plan_default_and_json():
    r = runner.invoke(app, ["plan"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    for needle in ("49,152 B/token", "12.88", "520 slots", "sudo sysctl iogpu.wired_limit_mb=122880",
                   "q2-mixed", "128 GB Mac", "after raising the limit", "Longest context"):
        assert needle in out, needle
    r = runner.invoke(app, ["plan", "--context", "32K", "--kv-bits", "8", "--no-mtp", "--recipe", "q3-mixed",
                            "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["plan"]["context"] == 32768 and data["plan"]["kv_bits"] == 8 and data["plan"]["mtp"] is False
    assert data["plan"]["recipe"] == "q3-mixed" and data["plan"]["full_kv"] == 26_112 * 32768
    mac128 = next(m for m in data["machines"] if m["name"] == "128 GB Mac")
    assert mac128["verdict"] == "fits"
    rows = [r for r in data["max_context"] if r["weights"] == "q4" and r["kv_bits"] is None]
    assert rows[0]["machines"]["128 GB Mac"] == {"default": 0, "raised": CTX}


def test_cli_plan_converted_folder(tmp_path):
    from step35_mlx.convert.quantize import convert_checkpoint

    src = tmp_path / "src"
    write_hf_checkpoint(src, tiny_config(moe_intermediate_size=64, share_expert_dim=64), num_shards=2)
    out = tmp_path / "q4"
    convert_checkpoint(src, out, recipe="q4", progress=False)
    r = runner.invoke(app, ["plan", "--model", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    sizes = P.folder_weight_sizes(out)
    assert data["plan"]["weights"] == sizes.trunk and data["plan"]["mtp_weights"] == sizes.mtp
    assert data["plan"]["context"] == 4096 and data["plan"]["activation_dtype_bytes"] == 4
    r = runner.invoke(app, ["plan", "--model", str(out)])
    assert r.exit_code == 0 and "this model" in r.output, r.output
    _one_line_error(runner.invoke(app, ["plan", "--model", str(out), "--recipe", "q4"]), "already quantized")


def test_cli_plan_user_mistakes(tmp_path):
    _one_line_error(runner.invoke(app, ["plan", "--kv-bits", "3"]), "--kv-bits must be none, 8 or 4")
    _one_line_error(runner.invoke(app, ["plan", "--recipe", "q5"]), "unknown recipe")
    _one_line_error(runner.invoke(app, ["plan", "--context", "10M"]), "outside 1..262,144")
    _one_line_error(runner.invoke(app, ["plan", "--context", "lots"]), "cannot read context")
    _one_line_error(runner.invoke(app, ["plan", "--model", str(tmp_path / "nope")]), "does not exist")
    _one_line_error(runner.invoke(app, ["plan", "--prefill-step", "0"]), "--prefill-step")
    r = runner.invoke(app, ["plan", "--help"])
    assert r.exit_code == 0 and "Examples" in r.output and "--kv-bits" in r.output


def test_parse_helpers():
    assert P.parse_tokens("32K") == 32768 and P.parse_tokens("256k") == CTX and P.parse_tokens("1,000") == 1000
    assert P.parse_kv_bits("none") is None and P.parse_kv_bits("8") == 8
    assert P.format_tokens(CTX) == "256K" and P.format_tokens(100) == "100"
