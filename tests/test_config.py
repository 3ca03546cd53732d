import copy
import json
from pathlib import Path

import pytest

from step35_mlx.config import ModelConfig
from step35_mlx.synthetic import tiny_config

from step35_mlx.data import RELEASE_CONFIG, release_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared/reference/step3p5-flash-config.json"


@pytest.fixture
def real_config():
    return release_config()


@pytest.mark.skipif(not SHARED.exists(), reason="shared/ reference folder not beside the checkout")
def test_bundled_release_config_is_the_reference_copy():
    assert json.loads(RELEASE_CONFIG.read_text()) == json.loads(SHARED.read_text())


def test_release_config_fields(real_config):
    cfg = ModelConfig.from_dict(real_config)
    assert cfg.num_hidden_layers == 45 and cfg.num_nextn_predict_layers == 3
    assert len(cfg.layer_types) == 48 and cfg.num_layers_total == 48
    assert cfg.rms_norm_eps == 1e-5  # absent from the release; class default
    assert cfg.moe_layers == frozenset(range(3, 45))
    full = cfg.layer(0)
    assert (full.attention_type, full.num_heads, full.num_kv_heads) == ("full_attention", 64, 8)
    assert full.rotary_dims == 64 and full.rope_theta == 5e6 and full.rope_scaling["factor"] == 2.0
    swa = cfg.layer(1)
    assert (swa.attention_type, swa.num_heads, swa.rotary_dims, swa.rope_theta) == ("sliding_attention", 96, 128, 1e4)
    assert swa.rope_scaling is None  # llama3 scaling only on yarn_only_types
    assert [cfg.layer(i).swiglu_limit for i in (42, 43, 44)] == [0.0, 7.0, 7.0]
    assert [cfg.layer(i).swiglu_limit_shared for i in (43, 44)] == [0.0, 16.0]
    mtp = [cfg.layer(45 + j) for j in range(3)]
    assert all(m.is_sliding and not m.is_moe and m.num_heads == 96 and m.swiglu_limit_shared == 0 for m in mtp)
    assert cfg.eos_token_id == [1, 2, 128007] and cfg.bos_token_id == 0


def test_step3p7_wrapper_reads_text_config(real_config):
    wrapped = {"model_type": "step3p7", "architectures": ["Step3p7ForConditionalGeneration"], "text_config": real_config}
    cfg = ModelConfig.from_dict(wrapped)
    assert cfg.model_type == "step3p7" and cfg.num_hidden_layers == 45 and cfg.num_nextn_predict_layers == 3


def test_explicit_eps_and_fallbacks():
    c = tiny_config()
    c["rms_norm_eps"] = 1e-6
    del c["layer_types"]
    cfg = ModelConfig.from_dict(c)
    assert cfg.rms_norm_eps == 1e-6
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[1] == "full_attention"


def _mutate(**changes):
    c = tiny_config()
    for k, v in changes.items():
        if callable(v):
            v(c)
        else:
            c[k] = v
    return c


@pytest.mark.parametrize(
    "config, field",
    [
        (_mutate(layer_types=["full_attention"] * 3), "layer_types"),
        (_mutate(rope_theta=[1e4] * 2), "rope_theta"),
        (_mutate(partial_rotary_factors=[1.0] * 4), "partial_rotary_factors"),
        (_mutate(swiglu_limits=[0.0]), "swiglu_limits"),
        (_mutate(num_attention_heads=5), "num_attention_heads"),
        (_mutate(attention_other_setting=lambda c: c["attention_other_setting"].update(num_attention_heads=7)),
         "attention_other_setting.num_attention_heads"),
        (_mutate(layer_types=lambda c: c["layer_types"].__setitem__(2, "linear_attention")), "layer_types[2]"),
        (_mutate(model_type="llama"), "model_type"),
        (_mutate(hidden_size=lambda c: c.pop("hidden_size")), "hidden_size"),
        (_mutate(vocab_size=-3), "vocab_size"),
        (_mutate(moe_layers_enum="1,2,x"), "moe_layers_enum"),
        (_mutate(moe_layers_enum="1,99"), "moe_layers_enum"),
        (_mutate(moe_top_k=99), "moe_top_k"),
        (_mutate(moe_router_activation="softmax"), "moe_router_activation"),
        (_mutate(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type"),
        (_mutate(partial_rotary_factors=lambda c: c["partial_rotary_factors"].__setitem__(0, 1.5)),
         "partial_rotary_factors[0]"),
        (_mutate(sliding_window=0), "sliding_window"),
        ({"model_type": "step3p7"}, "text_config"),
        # Fields of the wrong JSON type: each names the field (load, info and verify all parse this way).
        (_mutate(rope_scaling="llama3"), "'rope_scaling' must be a JSON object"),
        (_mutate(rope_scaling=lambda c: c["rope_scaling"].update(factor="2")), "'rope_scaling.factor' must be a number"),
        (_mutate(moe_top_k="8"), "'moe_top_k' must be an int"),
        (_mutate(moe_num_experts=8.0), "'moe_num_experts' must be an int"),
        (_mutate(max_position_embeddings="4096"), "'max_position_embeddings' must be an int"),
        (_mutate(max_position_embeddings=0), "'max_position_embeddings' must be positive"),
        (_mutate(rope_theta="10000"), "'rope_theta' must be a list of 9 per-layer values"),
        (_mutate(layer_types="full_attention"), "'layer_types' must be a list of 9 per-layer values"),
        (_mutate(layer_types="full_attention"), "'layer_types' must be a list"),
        (_mutate(swiglu_limits=lambda c: c["swiglu_limits"].__setitem__(1, "7")), "'swiglu_limits[1]' must be a number"),
        (_mutate(rope_theta=lambda c: c["rope_theta"].__setitem__(3, True)), "'rope_theta[3]' must be a number"),
        (_mutate(rms_norm_eps="1e-5"), "'rms_norm_eps' must be a number"),
        (_mutate(use_moe="yes"), "'use_moe' must be true or false"),
        (_mutate(eos_token_id="2"), "'eos_token_id' must be an int or a list of ints"),
        (_mutate(attention_other_setting=lambda c: c["attention_other_setting"].update(num_attention_heads="4")),
         "'attention_other_setting.num_attention_heads' must be an int"),
        (_mutate(quantization="q4"), "'quantization' must be a JSON object"),
        (_mutate(quantization={"bits": "4", "group_size": 64}), "'quantization.bits' must be an int"),
        (_mutate(quantization={"bits": 4, "group_size": 64, "model.layers.0.self_attn.q_proj": 8}),
         "'quantization.model.layers.0.self_attn.q_proj' must be false or a JSON object"),
    ],
)
def test_bad_configs_name_the_field(config, field):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict(copy.deepcopy(config))
    assert field in str(e.value)


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
