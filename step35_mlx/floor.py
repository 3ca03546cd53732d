"""The compute floor of a decode step: the matmuls of one token's active weights and nothing else.

Per token: every attention projection (q, k, v, g and o), the router, the shared expert or
dense MLP of every layer, ``top_k`` routed experts per MoE layer (random ids) and the LM
head, each on an input of the right shape, evaluated together once. No attention over
the cache, norms, RoPE, sampling or graph building between layers: decode can approach this
time but not beat it on one stream, so ``decode time / floor time`` shows how much of a
step goes elsewhere.
"""

from __future__ import annotations

import time

import mlx.core as mx


def floor_step(model, key: mx.array) -> list[mx.array]:
    """The active-weight matmuls of one decode token (lazy, independent of each other)."""
    H = model.config.hidden_size
    k_x, k_e = mx.random.split(key)
    x = mx.random.normal((1, 1, H), key=k_x)
    outs = []
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        q = a.q_proj(x)
        outs += [q, a.k_proj(x), a.v_proj(x), a.o_proj(q)]
        if hasattr(a, "g_proj"):
            outs.append(a.g_proj(x))
        if layer.is_moe:
            moe = layer.moe
            E = moe.router_bias.shape[0]
            k_e, sub = mx.random.split(k_e)
            idx = mx.random.randint(0, E, (1, 1, moe.top_k), key=sub)
            outs += [moe.gate(x.astype(mx.float32)), moe.experts(x, idx.astype(mx.uint32)), layer.share_expert(x)]
        else:
            outs.append(layer.mlp(x))
    outs.append(model.lm_head(x))
    return outs


def floor_tokens_per_s(model, tokens: int = 32, seed: int = 0) -> float:
    """Tokens/s if a decode step cost only its active-weight matmuls (one stream, after a warm-up)."""
    key = mx.random.key(seed)
    mx.eval(floor_step(model, key))
    keys = mx.random.split(key, tokens)
    mx.eval(keys)
    t0 = time.perf_counter()
    for i in range(tokens):
        mx.eval(floor_step(model, keys[i]))
    return tokens / (time.perf_counter() - t0)
