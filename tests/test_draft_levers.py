"""Cheaper MTP drafts stored in draft.json: lower-bit MTP modules and the confidence gate stay exact."""

import json
import math
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from step35_mlx import load, load_model
from step35_mlx.draft_config import DRAFT_CONFIG_FILE, DraftConfig, load_draft_config, save_draft_config
from step35_mlx.draft_gate import confident, draft_confidence
from step35_mlx.draft_quant import requantize_linear
from step35_mlx.generate import ar_tokens
from step35_mlx.hub import DEMO_DIR
from step35_mlx.sampling import SamplingParams
from step35_mlx.speculative import MTPDecoder, SpecStats, speculative_tokens
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

from clirun import one_error_line, run_cli
from samplinglaw import assert_same_law, exact_law, mtp_counts

GREEDY = SamplingParams(temperature=0)
SETTING = DraftConfig(head_bits=3, layer_bits=2, min_confidence=0.05)


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    """The bundled demo with a draft.json: MTP heads at 3 bits, the rest of the modules at 2, gate 0.05."""
    folder = tmp_path_factory.mktemp("drafts") / "demo"
    shutil.copytree(DEMO_DIR, folder)
    save_draft_config(folder, SETTING)
    return folder


@pytest.fixture(scope="module")
def demo_drafts(demo_copy):
    return load(demo_copy)


def _take(gen, n):
    out = []
    for t in gen:
        out.append(t)
        if len(out) == n:
            break
    gen.close()
    return out


def test_requantize_linear_error_is_one_grid_step():
    w = mx.random.normal((16, 128), key=mx.random.key(1))
    dense = nn.Linear(128, 16, bias=False)
    dense.weight = w
    four = dense.to_quantized(group_size=64, bits=4)
    stored = mx.dequantize(four.weight, four.scales, four.biases, 64, 4)
    for layer, source in ((dense, w), (four, stored)):  # a quantized layer is requantized from its stored values
        for bits in (2, 3):
            q = requantize_linear(layer, bits)
            assert (q.bits, q.group_size) == (bits, 64)
            deq = np.array(mx.dequantize(q.weight, q.scales, q.biases, 64, bits), dtype=np.float64)
            groups = np.array(source, dtype=np.float64).reshape(16, 2, 64)
            step = (groups.max(-1) - groups.min(-1)) / (2**bits - 1)  # the affine grid's spacing per group
            err = np.abs(deq.reshape(16, 2, 64) - groups) / step[..., None]
            # MLX keeps 0 on the grid, so an edge value can be up to a step off; rounding errors average step/sqrt(12)
            assert err.max() <= 1.0 and np.sqrt((err**2).mean()) < 1.5 / math.sqrt(12), (err.max(), (err**2).mean())
    with pytest.raises(ValueError, match="bits"):
        requantize_linear(dense, 7)


def test_draft_config_round_trip_and_validation(tmp_path):
    assert load_draft_config(tmp_path) == DraftConfig() and load_draft_config(None) == DraftConfig()
    save_draft_config(tmp_path, SETTING)
    assert load_draft_config(tmp_path) == SETTING
    for bad in ('{"head_bits": 7}', '{"min_confidence": 1.5}', '{"layer_bits": true}', '{"gate": 0.1}', "[1]", "{"):
        (tmp_path / DRAFT_CONFIG_FILE).write_text(bad)
        with pytest.raises(ValueError, match="draft.json is not a valid draft setting"):
            load_draft_config(tmp_path)


def test_draft_confidence_and_gate_match_numpy():
    logits = mx.array([2.0, 0.5, -1.0, 1.5])
    p = np.exp(np.array(logits, np.float64))
    p /= p.sum()
    assert abs(draft_confidence(logits, None).item() - p.max()) < 1e-6
    q = mx.array([0.1, 0.6, 0.3])
    assert abs(draft_confidence(mx.zeros(3), q).item() - 0.6) < 1e-7
    assert confident(object(), mx.array(0.3), 0.3) and not confident(object(), mx.array(0.29), 0.3)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_with_draft_json_equals_plain(demo_drafts, depth):
    """Requantized modules + gate from draft.json (through MTPDecoder, the path every command takes)."""
    model, tok = demo_drafts
    mtp = model.model.mtp[0]
    assert mtp.shared_head.output.bits == 3 and mtp.mlp.down_proj.bits == 2 and mtp.eh_proj.bits == 2
    assert model.layers[0].mlp.down_proj.bits == 4  # the trunk is untouched
    prompt = mx.array(tok.apply_chat_template([{"role": "user", "content": "What is a generator?"}],
                                              add_generation_prompt=True))
    n = 64
    ref = _take(ar_tokens(model, model.make_cache(), prompt, GREEDY), n)
    decoder = MTPDecoder(depth)
    assert _take(decoder(model, model.make_cache(), prompt, GREEDY), n) == ref
    stats = decoder.stats
    assert stats.tokens_per_verify > 1.4
    assert 0 < sum(stats.lengths[:depth]) < stats.verifies  # the gate cut some steps short, not all


def test_sampled_gated_mtp_distribution_equals_target(tmp_path_factory):
    """Gating on the draft probabilities keeps the sampled output distributed as plain sampling."""
    V = 5
    cfg = tiny_config(num_layers=2, full_layers={0}, moe_layers={1}, sliding_window=4, vocab_size=V,
                      hidden_size=32, head_dim=8, num_mtp=2)
    path = tmp_path_factory.mktemp("gate") / "ckpt"
    write_hf_checkpoint(path, cfg, seed=1)
    model = load_model(path, dtype=mx.float32)
    prompt = mx.array([1, 2, 3, 4, 0, 1])
    params = SamplingParams(temperature=1.0, top_k=4)
    _, exact = exact_law(model, prompt, params, 3)
    counts, stats = mtp_counts(model, prompt, params, 3, 400, depth=2, min_confidence=0.35)
    assert min(stats.lengths) > 20  # the gate stopped after 0, 1 and 2 drafts
    assert_same_law(counts, exact)


def test_cli_generate_with_draft_json(demo_copy, tmp_path):
    args = ["generate", "--model", str(demo_copy), "-p", "How do I open a file?", "-t", "0", "-n", "40", "--json"]
    plain = run_cli(args + ["--no-mtp"], tmp_path / "h")
    drafted = run_cli(args + ["--draft-depth", "3"], tmp_path / "h")
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    a, b = json.loads(plain.stdout), json.loads(drafted.stdout)
    assert b["text"] == a["text"] and a["text"]
    assert b["stats"]["draft_depth"] == 3 and b["stats"]["tokens_per_verify"] > 1.3
    bad = tmp_path / "bad"
    shutil.copytree(demo_copy, bad)
    (bad / DRAFT_CONFIG_FILE).write_text('{"layer_bits": 1}')
    line = one_error_line(run_cli(["generate", "--model", str(bad), "-p", "hi", "-n", "2"], tmp_path / "h"))
    assert "draft.json is not a valid draft setting" in line and "layer_bits" in line



def test_the_gate_never_looks_at_the_sampled_draft(tmp_path_factory):
    """Whether a sampled draft is kept may depend on the distribution it was drawn from, never on the
    token drawn: a gate that drops unlikely draws skews the output (q = (0.9, 0.1), p = (0.5, 0.5),
    dropping the 0.1 draws gives 0.55 / 0.45). With depth 1 the first step's draft count must be a
    function of the first token alone (it fixes the draft distribution), whatever the seed."""
    cfg = tiny_config(num_layers=2, full_layers={0}, moe_layers={1}, sliding_window=4, vocab_size=5,
                      hidden_size=32, head_dim=8, num_mtp=1)
    path = tmp_path_factory.mktemp("gatekey") / "ckpt"
    write_hf_checkpoint(path, cfg, seed=1)
    model = load_model(path, dtype=mx.float32)
    prompt = mx.array([1, 2, 3, 4, 0, 1])
    kept_by_first: dict[int, set[int]] = {}
    for seed in range(40):
        stats = SpecStats(1)
        out = _take(speculative_tokens(model, model.make_cache(), prompt, SamplingParams(temperature=1.0), depth=1,
                                       key=mx.random.key(seed), stats=stats, min_confidence=0.45), 2)
        assert stats.verifies == 1
        kept_by_first.setdefault(out[0], set()).add(stats.lengths.index(1))
    assert all(len(v) == 1 for v in kept_by_first.values()), kept_by_first
    assert {n for v in kept_by_first.values() for n in v} == {0, 1}, "the gate must both keep and drop here"
