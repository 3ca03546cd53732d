"""Quantized models equal their dequantized twins; MLX folders with a quantization block load back."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from step35_mlx import Model, load_model
from step35_mlx.layers.moe import QuantizedSwitchLinear
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

from conftest import rel_err, tokens_for

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def dequantized_twin(model: Model) -> Model:
    """A float model whose weights are exactly the quantized model's dequantized weights."""
    weights = {}
    quantized_paths = set()
    for path, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            quantized_paths.add(path)
            weights[f"{path}.weight"] = mx.dequantize(
                module.weight, module.scales, module.get("biases"), module.group_size, module.bits, mode=module.mode
            )
    for k, v in tree_flatten(model.parameters()):
        owner, leaf = k.rsplit(".", 1)
        if owner not in quantized_paths:
            weights[k] = v
    twin = Model(model.config)
    twin.load_weights(list(weights.items()), strict=True)
    mx.eval(twin.parameters())
    return twin


def _predicate(bits):
    def pred(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if path.endswith("moe.gate"):
            return {"group_size": 32, "bits": 8}
        return {"group_size": 32, "bits": bits}

    return pred


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    cfg = tiny_config(hidden_size=64, num_layers=4, full_layers={0, 3}, moe_layers={1, 2, 3}, sliding_window=6,
                      head_dim=32, intermediate_size=128, moe_intermediate_size=64, share_expert_dim=64)
    path = tmp_path_factory.mktemp("q") / "hf"
    write_hf_checkpoint(path, cfg, seed=7)
    return path, cfg


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_equals_dequantized_twin(float_ckpt, bits):
    path, cfg = float_ckpt
    model = load_model(path, dtype=mx.float32)
    nn.quantize(model, class_predicate=_predicate(bits))
    assert isinstance(model.layers[1].moe.gate_proj, QuantizedSwitchLinear)
    assert isinstance(model.model.mtp[0].shared_head.output, nn.QuantizedLinear)
    twin = dequantized_twin(model)
    T = 30
    toks = tokens_for(cfg["vocab_size"], T, seed=1)
    # Prefill with >= 64 token-expert pairs takes the sorted gather path; decode takes the unsorted one.
    assert rel_err(model(toks), twin(toks)) <= 1e-5
    cache, tcache = model.make_cache(), twin.make_cache()
    model(toks[:, :20], cache=cache), twin(toks[:, :20], cache=tcache)
    for t in range(20, T):
        a = model(toks[:, t : t + 1], cache=cache)
        b = twin(toks[:, t : t + 1], cache=tcache)
        assert rel_err(a, b) <= 1e-5
    # and quantization really changed the weights (the comparison above is not float-vs-float)
    ref = load_model(path, dtype=mx.float32)
    assert rel_err(twin.layers[1].moe.gate_proj.weight, ref.layers[1].moe.gate_proj.weight) > 1e-3


def test_mlx_folder_with_quantization_block_loads(float_ckpt, tmp_path):
    path, cfg = float_ckpt
    model = load_model(path, dtype=mx.float32)
    nn.quantize(model, class_predicate=_predicate(4))
    out = tmp_path / "mlx"
    out.mkdir()
    params = dict(tree_flatten(model.parameters()))
    names = sorted(params)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        mx.save_safetensors(str(out / fname), {k: params[k] for k in chunk})
        weight_map.update({k: fname for k in chunk})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    quant = {"group_size": 32, "bits": 4, "mode": "affine"}
    for p, m in model.named_modules():
        if isinstance(m, QUANTIZED) and p.endswith("moe.gate"):
            quant[p] = {"group_size": 32, "bits": 8}
    (out / "config.json").write_text(json.dumps({**cfg, "quantization": quant}))
    loaded = load_model(out)
    assert loaded.layers[1].moe.gate.bits == 8 and loaded.layers[1].moe.gate_proj.bits == 4
    toks = tokens_for(cfg["vocab_size"], 25, seed=3)
    assert rel_err(loaded(toks), model(toks)) == 0.0
