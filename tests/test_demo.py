"""The bundled demo model: loads offline, matches its checksums, reproduces its recorded quality."""

import hashlib
import json
import math

import mlx.core as mx
import pytest

from step35_mlx import load
from step35_mlx.hub import DEMO_DIR
from step35_mlx.tune import teacher_forced_agreement

MANIFEST = json.loads((DEMO_DIR / "manifest.json").read_text())


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def test_bundled_files_match_their_checksums():
    files = MANIFEST["files"]
    assert set(files) == {p.name for p in DEMO_DIR.iterdir()} - {"manifest.json"}
    for name, digest in files.items():
        assert hashlib.sha256((DEMO_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) < 15e6


def test_demo_is_the_full_step_architecture(demo):
    model, tok = demo
    cfg = model.config
    kinds = {model.config.layer(i).attention_type for i in range(cfg.num_hidden_layers)}
    assert kinds == {"full_attention", "sliding_attention"}
    assert cfg.sliding_num_heads != cfg.num_attention_heads  # different head counts per layer type
    assert cfg.moe_layers and cfg.moe_num_experts >= 16 and cfg.moe_top_k >= 2
    assert any(cfg.swiglu_limits) and any(cfg.swiglu_limits_shared)
    assert model.num_mtp == 3 and cfg.raw["quantization"]["bits"] == 4
    for s in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
              "<tool_response>", "</tool_response>"):
        assert len(tok.encode(s, add_special_tokens=False)) == 1, s


def test_recorded_perplexity_reproduces_within_1_percent(demo):
    model, _ = demo
    chunks = json.loads((DEMO_DIR / "heldout_tokens.json").read_text())["chunks"][: MANIFEST["check_chunks"]]
    nll, n = 0.0, 0
    for ch in chunks:
        logits = model(mx.array([ch]))[0, :-1].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll -= float(mx.take_along_axis(lp, mx.array(ch[1:])[:, None], axis=-1).sum().item())
        n += len(ch) - 1
    ppl = math.exp(nll / n)
    assert ppl == pytest.approx(MANIFEST["check_ppl_quantized"], rel=0.01)
    # far below the unigram baseline recorded at training time
    assert ppl < MANIFEST["train_report"]["unigram_ppl"] / 10


def test_mtp_heads_agree_with_the_trunk(demo):
    model, _ = demo
    ch = json.loads((DEMO_DIR / "heldout_tokens.json").read_text())["chunks"][0]
    agree = teacher_forced_agreement(model, ch)["vs_trunk"]
    assert agree[0] >= 0.5, agree


def test_greedy_mtp_on_the_demo_drafts_for_real(demo):
    """A checkpoint with trained MTP heads must speed up decoding: no silent fallback to AR."""
    from step35_mlx.generate import stream_generate

    model, tok = demo
    msgs = [{"role": "user", "content": "What does the with statement do?"}]
    plain = list(stream_generate(model, tok, msgs, max_tokens=48, temperature=0, mtp=False))
    spec = list(stream_generate(model, tok, msgs, max_tokens=48, temperature=0, mtp=True, draft_depth=2))
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    st = spec[-1].stats
    assert st.tokens_per_verify > 1.3 and st.acceptance[0] > 0.4, st
