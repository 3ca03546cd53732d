"""Conversion to MLX: streaming, resumable, exact against a dequantized twin, MTP kept.

All models are tiny synthetic ones from ``step35_mlx.synthetic`` (real HF key layout:
fused 3-D experts, ``share_expert`` outside ``moe``, MTP layers with
``transformer.shared_head``; Step 3.7 prefixes on request).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from step35_mlx import load_model
from step35_mlx.cli import app
from step35_mlx.config import ModelConfig
from step35_mlx.convert.quantize import PROGRESS_FILE, ConvertError, convert_checkpoint, parse_size
from step35_mlx.safetensors_io import encode_header
from step35_mlx.convert.source import E4M3_TABLE
from step35_mlx.convert.verify import verify
from step35_mlx.loader import hf_to_internal
from step35_mlx.model import Model
from step35_mlx.quant.recipes import RECIPES, classify, plan_sizes, uniform
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
REAL_CONFIG = REPO.parent / "shared" / "reference" / "step3p5-flash-config.json"
TOKENS = mx.array([[0, 17, 5, 99, 3, 250, 42, 8, 8, 130, 77, 1, 200, 64]])


def small_config(**kw) -> dict:
    # Expert / shared widths of 64 so group 64 applies to every expert matrix.
    base = dict(moe_intermediate_size=64, share_expert_dim=64)
    base.update(kw)
    return tiny_config(**base)


# ----------------------------------------------------------------------------- helpers


def read_all(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def dequantized_twin(folder: Path) -> Model:
    """The converted model with every quantized weight replaced by ``mx.dequantize`` (float32)."""
    cfg = json.loads((folder / "config.json").read_text())
    quant = cfg.pop("quantization")
    config = ModelConfig.from_dict(cfg)
    raw = read_all(folder)
    weights = {}
    for k, v in raw.items():
        if k.endswith((".scales", ".biases")):
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base is not None and f"{base}.scales" in raw:
            spec = quant.get(base) or {"group_size": quant["group_size"], "bits": quant["bits"]}
            v = mx.dequantize(v, raw[f"{base}.scales"].astype(mx.float32), raw[f"{base}.biases"].astype(mx.float32),
                              group_size=spec["group_size"], bits=spec["bits"])
        weights[hf_to_internal(k, config.num_hidden_layers)] = v.astype(mx.float32)
    model = Model(config)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def assert_twin_equal(folder: Path) -> None:
    q = load_model(folder, dtype=mx.float32)
    twin = dequantized_twin(folder)
    a, b = q(TOKENS), twin(TOKENS)
    rel = float(mx.max(mx.abs(a - b))) / float(mx.max(mx.abs(b)))
    assert rel <= 1e-5, rel
    # The MTP modules too: teacher-forced logits of every module.
    assert q.num_mtp == twin.num_mtp
    for x, y in zip(q.mtp_logits(TOKENS, q.forward_hidden(TOKENS)),
                    twin.mtp_logits(TOKENS, twin.forward_hidden(TOKENS))):
        assert float(mx.max(mx.abs(x - y))) <= 1e-5 * float(mx.max(mx.abs(y)))


def sha_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def final_files(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name == "config.json" or p.name.endswith(".safetensors") or p.name.endswith(".index.json"))


@pytest.fixture(scope="module")
def src_f32(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src_f32")
    write_hf_checkpoint(path, small_config(), num_shards=3)
    (path / "tokenizer_config.json").write_text("{}")
    (path / "chat_template.jinja").write_text("{{ bos_token }}")
    (path / "generation_config.json").write_text('{"temperature": 1.0}')
    return path


# ----------------------------------------------------------------------------- conversion is exact


def test_convert_f32_mtp_matches_dequantized_twin(src_f32, tmp_path):
    out = tmp_path / "q4"
    res = convert_checkpoint(src_f32, out, recipe="q4", shard_size=150_000, progress=False)
    assert len(res.plan.shards) >= 2
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= files
    assert PROGRESS_FILE not in files and not any(n.endswith(".tmp") for n in files)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["step35_mlx"]["norm_weights"] == "zero_centered" and cfg["step35_mlx"]["recipe"] == "q4"
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.layers.1.moe.gate"] is False
    raw = read_all(out)
    # MTP modules present (quantized eh_proj / head, float norms), norms unshifted, router float.
    for j in range(3):
        for k in ("enorm.weight", "hnorm.weight", "eh_proj.scales", "shared_head.output.scales",
                  "shared_head.norm.weight", "self_attn.q_proj.scales"):
            assert f"model.mtp.{j}.{k}" in raw
    src = {}
    for f in sorted(src_f32.glob("*.safetensors")):
        src.update(mx.load(str(f)))
    assert mx.array_equal(raw["model.mtp.0.enorm.weight"], src["model.layers.6.enorm.weight"])
    assert mx.array_equal(raw["model.norm.weight"], src["model.norm.weight"])
    assert mx.array_equal(raw["model.layers.1.moe.gate.weight"], src["model.layers.1.moe.gate.weight"])
    assert raw["model.layers.1.moe.router_bias"].dtype == mx.float32
    # The packed experts are exactly mx.quantize of the source (slicing by experts changes nothing).
    wq, s, b = mx.quantize(src["model.layers.2.moe.down_proj.weight"], 64, 4)
    assert mx.array_equal(raw["model.layers.2.moe.down_proj.weight"], wq)
    assert mx.array_equal(raw["model.layers.2.moe.down_proj.scales"], s)
    assert_twin_equal(out)
    assert verify(out).ok


def test_convert_bf16_step37_and_mixed_recipe(tmp_path):
    cfg = small_config(model_type="step3p7")
    src = tmp_path / "src37"
    write_hf_checkpoint(src, cfg, dtype="bfloat16", num_shards=4)
    # A vision tensor the converter must drop.
    mx.save_safetensors(str(src / "vision.safetensors"), {"model.vision_model.patch.weight": mx.zeros((4, 4))})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.vision_model.patch.weight"] = "vision.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "q3"
    convert_checkpoint(src, out, recipe="q3-mixed", shard_size=120_000, progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "step3p7" and "text_config" in written
    raw = read_all(out)
    assert raw["model.layers.2.moe.gate_proj.scales"].dtype == mx.bfloat16
    assert raw["model.layers.2.moe.gate_proj.weight"].shape[-1] == 64 * 3 // 32  # 3-bit experts
    assert written["quantization"]["bits"] == 3
    assert written["quantization"]["model.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 6}
    assert "model.mtp.2.shared_head.output.scales" in raw
    assert not any("vision" in k for k in raw)
    assert_twin_equal(out)


def test_convert_bf16_drop_mtp(tmp_path):
    src = tmp_path / "src"
    write_hf_checkpoint(src, small_config(), dtype="bfloat16", num_shards=2)
    out = tmp_path / "out"
    convert_checkpoint(src, out, recipe="q8", keep_mtp=False, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0
    assert not any(k.startswith("model.mtp.") or ".layers.6." in k for k in read_all(out))
    m = load_model(out)
    assert len(m.model.mtp) == 0
    assert_twin_equal(out)


def test_source_without_mtp_needs_drop_mtp(tmp_path):
    cfg = small_config()
    from step35_mlx.synthetic import random_hf_weights

    write_hf_checkpoint(tmp_path / "src", cfg, random_hf_weights(cfg, mtp=False), num_shards=2)
    with pytest.raises(ConvertError, match="--drop-mtp"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- FP8 source


def _fp8_encode(x: np.ndarray) -> np.ndarray:
    """Nearest e4m3 code for each value (test helper, via the decode table)."""
    finite = np.where(np.isnan(E4M3_TABLE), np.inf, E4M3_TABLE)
    return np.abs(x[..., None] - finite).argmin(-1).astype(np.uint8)


def test_fp8_blockwise_source_is_dequantized(tmp_path):
    cfg = small_config()
    src = tmp_path / "fp8"
    weights = write_hf_checkpoint(src, cfg, num_shards=2)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [32, 32]}
    (src / "config.json").write_text(json.dumps(cfg))
    # Re-store the routed experts of layer 2 and one attention matrix as FP8 + block scales.
    rng = np.random.default_rng(0)
    expect = {}
    extra = {}
    for key in ("model.layers.2.moe.up_proj.weight", "model.layers.3.self_attn.q_proj.weight"):
        w = weights[key]
        blocks = w.shape[:-2] + (-(-w.shape[-2] // 32), -(-w.shape[-1] // 32))
        scale = rng.uniform(0.001, 0.01, blocks).astype(np.float32)
        full = np.repeat(np.repeat(scale, 32, -2), 32, -1)[..., : w.shape[-2], : w.shape[-1]]
        codes = _fp8_encode(w / full)
        expect[key] = (E4M3_TABLE[codes] * full)
        extra[key] = mx.array(codes)
        extra[key.replace(".weight", ".weight_scale_inv")] = mx.array(scale)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for f in sorted(src.glob("model-*.safetensors")):
        shard = mx.load(str(f))
        mx.eval(shard)
        if not any(k in shard for k in extra):
            continue
        arrays = {}
        for k, v in shard.items():
            if k in extra:
                arrays[k] = extra[k]
                arrays[k.replace(".weight", ".weight_scale_inv")] = extra[k.replace(".weight", ".weight_scale_inv")]
                index["weight_map"][k.replace(".weight", ".weight_scale_inv")] = f.name
            else:
                arrays[k] = v
        _write_with_fp8(f, arrays, set(extra) - {k for k in extra if k.endswith("_inv")})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))

    out = tmp_path / "out"
    convert_checkpoint(src, out, recipe="q8", progress=False, chunk_elems=700)
    raw = read_all(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for key, w in expect.items():
        name = hf_to_internal(key, 6)[: -len(".weight")]
        ref = mx.quantize(mx.array(w).astype(mx.bfloat16), 64, 8)
        assert mx.array_equal(raw[name + ".weight"], ref[0]), key
        assert mx.array_equal(raw[name + ".scales"], ref[1]), key
    assert_twin_equal(out)


def _write_with_fp8(path: Path, arrays: dict, fp8_names: set) -> None:
    """safetensors writer that labels uint8 arrays in ``fp8_names`` as F8_E4M3."""
    dt = {mx.float32: "F32", mx.bfloat16: "BF16", mx.uint8: "U8"}
    entries = []
    for k, v in arrays.items():
        entries.append((k, "F8_E4M3" if k in fp8_names else dt[v.dtype], tuple(v.shape)))
    header, _ = encode_header(entries)
    with open(path, "wb") as f:
        f.write(header)
        for k, v in arrays.items():
            a = np.array(v.view(mx.uint16)) if v.dtype == mx.bfloat16 else np.array(v)
            f.write(a.tobytes())


def test_fp8_per_channel_scale_source(tmp_path):
    cfg = small_config()
    src = tmp_path / "fp8c"
    weights = write_hf_checkpoint(src, cfg, num_shards=1)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (src / "config.json").write_text(json.dumps(cfg))
    key = "model.layers.0.mlp.up_proj.weight"
    w = weights[key]
    scale = (np.abs(w).max(-1, keepdims=True) / 448).astype(np.float32)
    codes = _fp8_encode(w / scale)
    shard = next(src.glob("model-*.safetensors"))
    arrays = mx.load(str(shard))
    mx.eval(arrays)
    arrays[key] = mx.array(codes)
    arrays[key.replace(".weight", ".weight_scale")] = mx.array(scale)
    _write_with_fp8(shard, arrays, {key})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][key.replace(".weight", ".weight_scale")] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    convert_checkpoint(src, out, recipe="q8", progress=False, chunk_elems=1000)
    ref = mx.quantize(mx.array(E4M3_TABLE[codes] * scale).astype(mx.bfloat16), 64, 8)
    raw = read_all(out)
    assert mx.array_equal(raw["model.layers.0.mlp.up_proj.weight"], ref[0])
    assert mx.array_equal(raw["model.layers.0.mlp.up_proj.biases"], ref[2])


def test_e4m3_table_matches_known_values():
    assert E4M3_TABLE[0x38] == 1.0 and E4M3_TABLE[0xB8] == -1.0
    assert E4M3_TABLE[0x7E] == 448.0 and np.isnan(E4M3_TABLE[0x7F])
    assert E4M3_TABLE[0x01] == 2.0 ** -9
    if hasattr(mx, "from_fp8"):
        ref = np.array(mx.from_fp8(mx.array(np.arange(256, dtype=np.uint8)), dtype=mx.float32))
        np.testing.assert_array_equal(np.nan_to_num(ref, nan=7.0), np.nan_to_num(E4M3_TABLE, nan=7.0))


def test_unsupported_source_quantization_is_named(tmp_path):
    cfg = small_config()
    write_hf_checkpoint(tmp_path / "src", cfg, num_shards=1)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="gptq"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- resumable and atomic


class Crash(Exception):
    pass


def _crash_at(event_name: str, shard: int):
    def hook(event, **info):
        if event == event_name and info["shard"] == shard:
            raise Crash(f"{event} {shard}")

    return hook


def test_interrupted_conversion_resumes_byte_identical(src_f32, tmp_path):
    kw = dict(recipe="q4", shard_size=100_000, progress=False)
    ref = tmp_path / "ref"
    convert_checkpoint(src_f32, ref, **kw)
    expected = sha_tree(ref)
    assert len([n for n in expected if n.startswith("model-")]) >= 3

    # Crash right after the first shard was committed.
    out = tmp_path / "out"
    with pytest.raises(Crash):
        convert_checkpoint(src_f32, out, hook=_crash_at("shard_done", 1), **kw)
    assert (out / PROGRESS_FILE).exists() and not (out / "config.json").exists()
    first = sorted(n for n in expected if n.startswith("model-0"))[0]
    assert final_files(out) == [first]  # only shard 1 under a final name
    assert not verify(out).ok
    # An exception in the middle of shard 2: its .tmp is removed, never a final-named partial file.
    with pytest.raises(Crash):
        convert_checkpoint(src_f32, out, hook=_crash_at("chunk", 2), **kw)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert final_files(out) == [first]
    res = convert_checkpoint(src_f32, out, **kw)
    assert res.skipped_shards == 1
    assert sha_tree(out) == expected
    # A finished folder is recognised; different settings are refused.
    assert convert_checkpoint(src_f32, out, **kw).already_complete
    with pytest.raises(ConvertError, match="already contains"):
        convert_checkpoint(src_f32, out, recipe="q8", shard_size=100_000, progress=False)


def test_killed_converter_process_resumes_byte_identical(src_f32, tmp_path):
    kw = dict(recipe="q2-mixed", shard_size=90_000, progress=False)
    ref = tmp_path / "ref"
    convert_checkpoint(src_f32, ref, **kw)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from step35_mlx.convert.quantize import convert_checkpoint
        def hook(event, **info):
            if event == "chunk" and info["shard"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        convert_checkpoint({str(src_f32)!r}, {str(out)!r}, recipe="q2-mixed", shard_size=90_000,
                           progress=False, hook=hook)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (out / "config.json").exists()
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # a killed process leaves its .tmp
    with pytest.raises(ConvertError, match="different settings"):
        convert_checkpoint(src_f32, out, recipe="q4", shard_size=90_000, progress=False)
    convert_checkpoint(src_f32, out, **kw)
    assert sha_tree(out) == sha_tree(ref)
    assert_twin_equal(out)


def test_truncated_source_shard_is_refused_before_writing(tmp_path):
    src = tmp_path / "src"
    write_hf_checkpoint(src, small_config(), num_shards=3)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=f"{shard.name} is truncated"):
        convert_checkpoint(src, out, progress=False)
    assert final_files(out) == []
    shard.write_bytes(data[:5])
    with pytest.raises(ConvertError, match="truncated"):
        convert_checkpoint(src, out, progress=False)
    assert final_files(out) == []


def test_index_naming_a_missing_tensor_is_refused(tmp_path):
    src = tmp_path / "src"
    write_hf_checkpoint(src, small_config(), num_shards=3)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = "model-00002-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="self_attn.extra.weight is in model-00002-of-00003.safetensors"):
        convert_checkpoint(src, out, progress=False)
    assert final_files(out) == []
    del index["weight_map"]["model.layers.0.self_attn.extra.weight"]
    index["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="missing shard"):
        convert_checkpoint(src, out, progress=False)
    assert final_files(out) == []


def test_output_folder_must_be_new_or_empty(src_f32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert_checkpoint(src_f32, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- verify


def test_verify_catches_missing_tensor_and_truncated_shard(src_f32, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(src_f32, out, recipe="q4", shard_size=150_000, progress=False)
    rep = verify(out)
    assert rep.ok, rep.summary()
    assert rep.quantized_modules > 0 and rep.num_shards >= 2

    # Drop one tensor from a shard (index updated consistently): reported as missing.
    shards = sorted(out.glob("model-*.safetensors"))
    tensors = mx.load(str(shards[0]))
    victim = sorted(tensors)[0]
    del tensors[victim]
    mx.save_safetensors(str(shards[0]), tensors)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"][victim]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    rep = verify(out)
    assert not rep.ok and any("missing tensor" in p and victim in p for p in rep.problems), rep.summary()

    # Truncate another shard: reported as truncated, by name.
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-7])
    rep = verify(out)
    assert any(shards[1].name in p and "truncated" in p for p in rep.problems), rep.summary()


def test_verify_catches_wrong_dtype(src_f32, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(src_f32, out, recipe="q8", shard_size=10**9, progress=False)
    shard = next(out.glob("model-*.safetensors"))
    tensors = mx.load(str(shard))
    tensors["model.layers.1.moe.router_bias"] = tensors["model.layers.1.moe.router_bias"].astype(mx.bfloat16)
    mx.save_safetensors(str(shard), tensors)
    rep = verify(out)
    assert any("wrong dtype" in p and "router_bias" in p for p in rep.problems), rep.summary()


# ----------------------------------------------------------------------------- sizes and recipes


def test_dry_run_sizes_match_spec_arithmetic():
    from step35_mlx.convert.dryrun import step3p5_flash_config

    cfg = step3p5_flash_config()
    if REAL_CONFIG.exists():
        assert json.loads(REAL_CONFIG.read_text()) == cfg
    q4 = plan_sizes(cfg, RECIPES["q4"])
    # spec §7: 4-bit g64 trunk incl. embed + lm_head, bf16 scale/bias = 110.8 GB (router 8-bit there, float here)
    assert abs(q4["trunk"] / 1e9 - 110.8) <= 0.2
    assert abs(q4["trunk_params"] / 1e9 - 196.956) < 0.001 and abs(q4["params"] / 1e9 - 199.384) < 0.001
    # Exact arithmetic for the routed experts: 42 layers x 3 x 288 x 1280 x 4096 weights at 4.5 bits.
    assert q4["routed_experts"] == 42 * 3 * 288 * 1280 * 4096 * 9 // 16
    assert q4["router"] == 42 * 288 * 4096 * 2 and q4["router_bias"] == 42 * 288 * 4
    # One MTP module at 4-bit: 0.158 GB + its head 0.297 GB (spec §7).
    assert abs(q4["mtp"] / 3 / 1e9 - (0.158 + 0.297)) < 0.01
    assert plan_sizes(cfg, RECIPES["q4"], mtp=False)["mtp"] == 0
    bf16 = plan_sizes(cfg, uniform(8))
    assert bf16["total"] > q4["total"]
    sizes = {n: plan_sizes(cfg, r)["total"] / 1e9 for n, r in RECIPES.items()}
    assert sizes["q2-mixed"] < 72 < sizes["q3-mixed"] < 96 < sizes["q4"]


def test_plan_sizes_equal_written_bytes(src_f32, tmp_path):
    cfg = json.loads((src_f32 / "config.json").read_text())
    for name in ("q4", "q3-mixed"):
        out = tmp_path / name
        convert_checkpoint(src_f32, out, recipe=name, progress=False)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert plan_sizes(cfg, RECIPES[name], source_dtype="F32")["total"] == index["metadata"]["total_size"]


def test_classify_names():
    assert classify("model.layers.3.moe.gate.weight") == ("trunk", "router")
    assert classify("model.layers.3.moe.down_proj.weight") == ("trunk", "routed_experts")
    assert classify("model.layers.3.share_expert.up_proj.weight") == ("trunk", "shared_experts")
    assert classify("model.mtp.1.shared_head.output.weight") == ("mtp", "mtp_head")
    assert classify("model.mtp.1.shared_head.norm.weight") == ("mtp", "norm")
    assert classify("model.mtp.0.enorm.weight") == ("mtp", "norm")
    assert classify("model.layers.0.self_attn.q_norm.weight") == ("trunk", "norm")
    assert classify("model.mtp.0.eh_proj.weight") == ("mtp", "eh_proj")
    r = RECIPES["q2-mixed"]
    assert r.spec_for("model.layers.3.moe.gate_proj.weight").bits == 2
    assert r.spec_for("model.layers.3.moe.gate.weight") is None
    assert r.spec_for("model.layers.3.self_attn.o_proj.weight").bits == 6
    assert r.spec_for("model.mtp.0.self_attn.o_proj.weight").bits == 4


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123
    with pytest.raises(ConvertError):
        parse_size("lots")


# ----------------------------------------------------------------------------- CLI and download errors

runner = CliRunner()


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output  # stdout and stderr interleaved
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], text
    assert "Traceback" not in text


def test_cli_user_mistakes_exit_2(tmp_path, monkeypatch):
    _one_line_error(runner.invoke(app, ["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]),
                    "folder not found")
    _one_line_error(runner.invoke(app, ["convert", "./does/not/exist", "--out", "o"]), "folder not found")
    _one_line_error(runner.invoke(app, ["convert", "not a repo", "--out", "o"]), "neither an existing folder")
    _one_line_error(runner.invoke(app, ["convert", "--recipe", "q5", "--out", "o"]), "unknown recipe")
    _one_line_error(runner.invoke(app, ["convert", "--recipe", "q4", "--bits", "3", "--out", "o"]), "either")
    _one_line_error(runner.invoke(app, ["convert", "--shard-size", "big", "--out", "o"]), "cannot read size")
    _one_line_error(runner.invoke(app, ["convert", "--bits", "7", "--out", "o"]), "bits must be one of")
    _one_line_error(runner.invoke(app, ["convert"]), "--out")
    _one_line_error(runner.invoke(app, ["verify", str(tmp_path / "nope")]), "folder not found")


def test_cli_dry_run_prints_sizes_and_fits():
    r = runner.invoke(app, ["convert", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "110.9" in r.output and "q2-mixed" in r.output and "75%" in r.output
    assert "112.23 GB (110.86 GB trunk + 1.37 GB MTP)" in r.output
    r = runner.invoke(app, ["convert", "--dry-run", "--drop-mtp"])
    assert "110.86 GB" in r.output and r.exit_code == 0


def test_cli_convert_and_verify_local_folder(src_f32, tmp_path):
    out = tmp_path / "cli-out"
    r = runner.invoke(app, ["convert", str(src_f32), "--out", str(out), "--bits", "8", "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8 and cfg["step35_mlx"]["source"] == src_f32.name
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 0 and "OK" in r.output, r.output
    r = runner.invoke(app, ["convert", str(src_f32), "--dry-run"])
    assert r.exit_code == 0 and "q3-mixed" in r.output


class _Sibling:
    def __init__(self, name, size):
        self.rfilename, self.size = name, size


class _Info:
    sha = "0" * 40

    def __init__(self, files):
        self.siblings = [_Sibling(n, s) for n, s in files]


def test_hub_unreachable_gives_clear_message(monkeypatch):
    import huggingface_hub

    from step35_mlx.convert.download import resolve_source

    def offline(self, *a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    with pytest.raises(ConvertError, match="cannot reach the Hugging Face Hub.*local|folder"):
        resolve_source("stepfun-ai/Step-3.5-Flash")
    r = runner.invoke(app, ["convert", "--out", "o"])
    _one_line_error(r, "cannot reach the Hugging Face Hub")


def test_hub_download_checks_disk_space_first(monkeypatch, tmp_path):
    import huggingface_hub

    from step35_mlx.convert import download

    files = [("model-00001-of-00002.safetensors", 300 * 10**9), ("model-00002-of-00002.safetensors", 100 * 10**9),
             ("config.json", 100), ("tokenizer.json", 1000), ("README.md", 10), ("sub/x.safetensors", 5)]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: _Info(files))
    called = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **k: called.append(k) or str(tmp_path))
    with pytest.raises(ConvertError, match=r"needs 400\.0 GB more to download"):
        download.resolve_source("stepfun-ai/Step-3.5-Flash", local_dir=tmp_path / "dl", progress=False)
    assert called == []
    # With enough space the filtered download is requested.
    monkeypatch.setattr(download, "_free_bytes", lambda p: 10**15)
    res = download.resolve_source("stepfun-ai/Step-3.5-Flash", local_dir=tmp_path / "dl", progress=False)
    assert res.repo_id == "stepfun-ai/Step-3.5-Flash" and called
    assert called[0]["allow_patterns"] == download.ALLOW_PATTERNS
    assert [n for n, _ in download.needed_files(_Info(files).siblings)] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json", "tokenizer.json"]


def test_repo_not_found_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors as hfe

    from step35_mlx.convert.download import resolve_source

    def missing(self, *a, **k):
        e = hfe.RepositoryNotFoundError.__new__(hfe.RepositoryNotFoundError)  # skip its HTTP-response init
        Exception.__init__(e, "404 not found")
        raise e

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(ConvertError, match="not found on the Hugging Face Hub"):
        resolve_source("someone/nothing-here")


# ----------------------------------------------------------------------------- quality


def test_quant_eval_reports_kl_and_agreement(src_f32, tmp_path):
    from step35_mlx.quant.quality import quant_eval

    q8, q2 = tmp_path / "q8", tmp_path / "q2"
    convert_checkpoint(src_f32, q8, recipe="q8", progress=False)
    convert_checkpoint(src_f32, q2, recipe="q2-mixed", progress=False)
    tokens = list(range(3, 200, 7))
    same = quant_eval(src_f32, src_f32, tokens=tokens)
    assert same["kl"] < 1e-9 and same["top1_agreement"] == 1.0
    m8 = quant_eval(q8, src_f32, tokens=tokens)
    m2 = quant_eval(q2, src_f32, tokens=tokens)
    assert 0 < m8["kl"] < m2["kl"]
    assert m8["top1_agreement"] >= m2["top1_agreement"]
    assert m8["num_tokens"] == len(tokens)
