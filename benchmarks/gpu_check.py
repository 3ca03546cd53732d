"""Short checks of step35-mlx on an MLX GPU backend (CUDA or Metal): bf16 gather path, compiled kernels,
MTP exactness and speed, quantized KV. Prints one JSON object; results and their reading: docs/device-checks.md.

Run from the repository root: python benchmarks/gpu_check.py
"""
import json, sys, time
import numpy as np
import mlx.core as mx
sys.path.insert(0, "tests")
from step35_mlx import load, load_model, stream_generate
from step35_mlx.synthetic import tiny_config, random_hf_weights, write_hf_checkpoint
from reference import reference_logits

out = {"device": str(mx.default_device()), "mlx": mx.__version__}
# 1. unquantized bf16 MoE synthetic (gather_mm bf16 on GPU) vs float64 reference
cfg = tiny_config(hidden_size=128, num_layers=4, num_mtp=1, vocab_size=512)
w = random_hf_weights(cfg, seed=3)
write_hf_checkpoint("/tmp/syn", cfg, w, dtype="float32")
tokens = np.random.default_rng(0).integers(0, 512, size=(1, 96))
ref = reference_logits(cfg, w, tokens[0])[0]
for dt in (mx.float32, mx.bfloat16):
    m = load_model("/tmp/syn", dtype=dt)
    got = np.array(m(mx.array(tokens)).astype(mx.float32))[0]
    out[f"synthetic_{dt}_rel_err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    cache = m.make_cache()
    steps = [m(mx.array(tokens[:, :50]), cache)] + [m(mx.array(tokens[:, i:i + 1]), cache) for i in range(50, 96)]
    cached = np.concatenate([np.array(s.astype(mx.float32))[0] for s in steps], axis=0)
    out[f"synthetic_{dt}_cached_vs_full"] = float(np.abs(cached - got).max() / np.abs(got).max())
# 2. bundled 4-bit demo: gather_qmm, compiled norm/router/SwiGLU, bf16 vs fp32, MTP exactness
msgs = [{"role": "user", "content": "What is a tuple?"}]
for dt in (mx.float32, mx.bfloat16):
    m, tok = load("demo", dtype=dt)
    res = {}
    for name, kw in (("plain", {"mtp": False}), ("mtp2", {"mtp": True, "draft_depth": 2}), ("mtp3", {"mtp": True, "draft_depth": 3})):
        t0 = time.perf_counter(); ids = []; st = None
        for c in stream_generate(m, tok, msgs, max_tokens=200, temperature=0, **kw):
            ids += c.token_ids; st = c.stats
        res[name] = {"ids": ids, "tps": st.generation_tps, "tpv": st.tokens_per_verify}
    out[f"demo_{dt}"] = {k: {"tps": round(v["tps"], 1), "tpv": round(v["tpv"], 2),
                             "equal_plain": v["ids"] == res["plain"]["ids"]} for k, v in res.items()}
    out[f"demo_{dt}_ids"] = res["plain"]["ids"][:200]
    try:
        kv = [c.token_ids for c in stream_generate(m, tok, msgs, max_tokens=100, temperature=0, kv_bits=8)]
        out[f"demo_{dt}_kv8_first100_agree"] = sum(a == b for a, b in zip([t for x in kv for t in x], res["plain"]["ids"]))
    except RuntimeError as e:
        out[f"demo_{dt}_kv8"] = str(e)[:200]
a, b = out.pop(f"demo_{mx.float32}_ids"), out.pop(f"demo_{mx.bfloat16}_ids")
out["bf16_vs_fp32_greedy_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
print(json.dumps(out, indent=1))
