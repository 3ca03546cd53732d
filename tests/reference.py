"""Independent float64 NumPy reference of the Step 3.5 Flash forward pass.

Written from the architecture spec (``step35-architecture.md`` §2-§3), not from
any runtime. It is slow and simple on purpose: one sequence, no cache, every
tensor in float64. Imported by the tests; not a test module itself.

Weights are a ``{hf_key: array}`` dict under the release's ``model.``-style names
(``model.language_model.`` names are accepted too), e.g. the return value of
``step35_mlx.synthetic.write_hf_checkpoint``. Configs may be step3p5 dicts or
step3p7 wrappers (``text_config`` is used).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "reference_hidden",
    "reference_logits",
    "reference_mtp_logits",
    "rms_norm",
    "rope_inv_freq",
    "apply_rope",
    "layer_settings",
]

_FULL = "full_attention"
_SLIDING = "sliding_attention"


# ----------------------------------------------------------------------------- config


def _text_config(config: dict) -> dict:
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def _per_layer(value, layer: int, default):
    """Entry ``layer`` of a per-layer list (scalar applies to all; missing -> default)."""
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        if layer < len(value) and value[layer] is not None:
            return value[layer]
        return default
    return value


def _moe_layers(cfg: dict) -> set[int]:
    if not cfg.get("use_moe", True):
        return set()
    enum = cfg.get("moe_layers_enum")
    if not enum:  # absent (or empty): spec §6.9 fallback, all trunk layers but 0
        return set(range(1, cfg["num_hidden_layers"]))
    return {int(s) for s in str(enum).split(",") if s.strip()}


def layer_settings(config: dict, layer: int) -> dict:
    """Everything the reference needs to know about layer ``layer`` (trunk or MTP)."""
    cfg = _text_config(config)
    if cfg.get("use_rope_layers"):
        raise NotImplementedError("non-empty use_rope_layers is not supported by the reference")
    types = cfg.get("layer_types")
    layer_type = types[layer] if types else (_SLIDING if layer % 2 == 0 else _FULL)
    sliding = layer_type == _SLIDING
    other = cfg.get("attention_other_setting") or {}
    if sliding and other:
        nh = other["num_attention_heads"]
        nkv = other["num_attention_groups"]
        hd = other.get("head_dim", cfg["head_dim"])
    else:
        nh, nkv, hd = cfg["num_attention_heads"], cfg["num_attention_groups"], cfg["head_dim"]
    partial = float(_per_layer(cfg.get("partial_rotary_factors"), layer, 1.0))
    yarn_types = cfg.get("yarn_only_types")
    scaling = cfg.get("rope_scaling")
    if yarn_types and layer_type not in yarn_types:
        scaling = None
    return {
        "type": layer_type,
        "sliding": sliding,
        "window": int(cfg.get("sliding_window", 512)),
        "num_heads": int(nh),
        "num_kv_heads": int(nkv),
        "head_dim": int(hd),
        "rope_theta": float(_per_layer(cfg.get("rope_theta", 10000.0), layer, 10000.0)),
        "rotary_dims": int(hd * partial),
        "rope_scaling": scaling,
        "moe": layer in _moe_layers(cfg),
        "limit": float(_per_layer(cfg.get("swiglu_limits"), layer, 0.0) or 0.0),
        "limit_shared": float(_per_layer(cfg.get("swiglu_limits_shared"), layer, 0.0) or 0.0),
    }


# ----------------------------------------------------------------------------- weights


class _Weights:
    """Lazy float64 view of an HF weight dict, keyed by ``model.``-style names."""

    def __init__(self, weights: dict):
        self._raw = {}
        for k, v in weights.items():
            if k.startswith("model.language_model."):
                k = "model." + k[len("model.language_model.") :]
            self._raw[k] = v
        self._cache: dict[str, np.ndarray] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = np.asarray(self._raw[key], dtype=np.float64)
        return self._cache[key]


# ----------------------------------------------------------------------------- pieces


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free form of 1 / (1 + exp(-x))


def _silu(x: np.ndarray) -> np.ndarray:
    return x * _sigmoid(x)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, zero_centered: bool = True) -> np.ndarray:
    """``x / sqrt(mean(x^2) + eps) * (1 + w)`` over the last axis (``* w`` if not zero-centred)."""
    x = np.asarray(x, dtype=np.float64)
    scale = (1.0 + w) if zero_centered else w
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope_inv_freq(rotary_dims: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies ``theta^(-2i/rotary_dims)``, i < rotary_dims/2, llama3-scaled if asked.

    llama3 (spec §2.3): wavelength ``lam = 2*pi/f``; ``lam < orig/high`` unchanged,
    ``lam > orig/low`` divided by ``factor``, otherwise
    ``(1 - s) * f / factor + s * f`` with ``s = (orig/lam - low) / (high - low)``.
    """
    f = theta ** (-np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims)
    if not scaling:
        return f
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise NotImplementedError(f"rope_scaling type {kind!r}")
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling["original_max_position_embeddings"])
    lam = 2.0 * np.pi / f
    s = (orig / lam - low) / (high - low)
    smooth = (1.0 - s) * f / factor + s * f
    return np.where(lam < orig / high, f, np.where(lam > orig / low, f / factor, smooth))


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """NeoX (rotate-half) RoPE on the first ``2*len(inv_freq)`` dims of ``x`` [T, heads, d]."""
    half = inv_freq.shape[0]
    if half == 0:
        return x
    rot = 2 * half
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, half]
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _swiglu(x, w_gate, w_up, w_down, limit: float) -> np.ndarray:
    g = _silu(x @ w_gate.T)
    u = x @ w_up.T
    if limit > 0:
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
    return (g * u) @ w_down.T


def _attention(cfg: dict, st: dict, W: _Weights, p: str, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    T = x.shape[0]
    nh, nkv, hd = st["num_heads"], st["num_kv_heads"], st["head_dim"]
    eps = cfg.get("rms_norm_eps", 1e-5)
    zc = cfg.get("zero_centered", True)
    q = (x @ W[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd)
    k = (x @ W[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd)
    v = (x @ W[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
    if cfg.get("use_qk_norm", True):
        q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps, zc)
        k = rms_norm(k, W[p + "self_attn.k_norm.weight"], eps, zc)
    inv = rope_inv_freq(st["rotary_dims"], st["rope_theta"], st["rope_scaling"])
    q = apply_rope(q, positions, inv)
    k = apply_rope(k, positions, inv)

    group = nh // nkv
    kv_of_head = np.arange(nh) // group  # q head h reads kv head h // (nh / nkv)
    k = k[:, kv_of_head]
    v = v[:, kv_of_head]
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    dq = positions[:, None] - positions[None, :]  # pos_q - pos_k
    allowed = dq >= 0
    if st["sliding"]:
        allowed &= dq < st["window"]
    scores = np.where(allowed[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("hts,shd->thd", probs, v)
    if cfg.get("use_head_wise_attn_gate", True):
        out = out * _sigmoid(x @ W[p + "self_attn.g_proj.weight"].T)[..., None]
    return out.reshape(T, nh * hd) @ W[p + "self_attn.o_proj.weight"].T


def _moe(cfg: dict, st: dict, W: _Weights, p: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Routed experts + shared expert; also returns the per-token top-k margin."""
    if cfg.get("moe_router_activation", "sigmoid") != "sigmoid":
        raise NotImplementedError("only sigmoid routers are supported")
    E = cfg["moe_num_experts"]
    k = cfg["moe_top_k"]
    probs = _sigmoid(x @ W[p + "moe.gate.weight"].T)  # [T, E]
    bias_key = p + "moe.router_bias"
    biased = probs + (W[bias_key] if cfg.get("use_moe_router_bias", True) and bias_key in W else 0.0)
    order = np.argsort(-biased, axis=-1, kind="stable")
    top = order[:, :k]
    sorted_scores = np.take_along_axis(biased, order, axis=-1)
    margin = sorted_scores[:, k - 1] - sorted_scores[:, k] if k < E else np.full(x.shape[0], np.inf)
    w = np.take_along_axis(probs, top, axis=-1)
    if cfg.get("norm_expert_weight", True):
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    w = w * cfg.get("moe_router_scaling_factor", 1.0)

    gate = W[p + "moe.gate_proj.weight"]
    up = W[p + "moe.up_proj.weight"]
    down = W[p + "moe.down_proj.weight"]
    # Dense over experts (every expert on every row, zero weight when not chosen):
    # slower, but each row's result is then bit-independent of the other rows.
    dense_w = np.zeros_like(probs)
    np.put_along_axis(dense_w, top, w, axis=-1)
    routed = np.zeros_like(x)
    for e in range(E):
        routed += dense_w[:, e : e + 1] * _swiglu(x, gate[e], up[e], down[e], st["limit"])
    shared = _swiglu(
        x,
        W[p + "share_expert.gate_proj.weight"],
        W[p + "share_expert.up_proj.weight"],
        W[p + "share_expert.down_proj.weight"],
        st["limit_shared"],
    )
    return routed + shared, margin


def _decoder_layer(cfg: dict, W: _Weights, layer: int, h: np.ndarray, positions: np.ndarray):
    """One pre-norm decoder layer; returns (output, route margin [T] or None for dense layers)."""
    st = layer_settings(cfg, layer)
    p = f"model.layers.{layer}."
    eps = cfg.get("rms_norm_eps", 1e-5)
    zc = cfg.get("zero_centered", True)
    a = h + _attention(cfg, st, W, p, rms_norm(h, W[p + "input_layernorm.weight"], eps, zc), positions)
    x = rms_norm(a, W[p + "post_attention_layernorm.weight"], eps, zc)
    if st["moe"]:
        ffn, margin = _moe(cfg, st, W, p, x)
    else:
        ffn = _swiglu(
            x,
            W[p + "mlp.gate_proj.weight"],
            W[p + "mlp.up_proj.weight"],
            W[p + "mlp.down_proj.weight"],
            st["limit_shared"],
        )
        margin = None
    return a + ffn, margin


def _final_norm(cfg: dict, W: _Weights, h: np.ndarray) -> np.ndarray:
    return rms_norm(h, W["model.norm.weight"], cfg.get("rms_norm_eps", 1e-5), cfg.get("zero_centered", True))


# ----------------------------------------------------------------------------- public


def _hidden(cfg: dict, W: _Weights, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(tokens).reshape(-1).astype(np.int64)
    positions = np.arange(tokens.shape[0], dtype=np.int64)
    h = W["model.embed_tokens.weight"][tokens]
    margin = np.full(tokens.shape[0], np.inf)
    for layer in range(cfg["num_hidden_layers"]):
        h, m = _decoder_layer(cfg, W, layer, h, positions)
        if m is not None:
            margin = np.minimum(margin, m)
    return h, margin


def reference_hidden(config: dict, weights: dict, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trunk forward of one sequence ``tokens`` [T] at positions 0..T-1.

    Returns ``(hidden, min_route_margin)``: the pre-final-norm hidden state
    [T, hidden_size] (float64) and, per token, the smallest over MoE layers of
    (k-th largest - (k+1)-th largest biased router score) (+inf without MoE
    layers), so tests can skip rows whose expert choice is a near tie.
    """
    cfg = _text_config(config)
    return _hidden(cfg, _Weights(weights), tokens)


def reference_logits(config: dict, weights: dict, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(logits [T, vocab] float64, min_route_margin [T])``: final norm + ``lm_head`` on the trunk."""
    cfg = _text_config(config)
    W = _Weights(weights)
    h, margin = _hidden(cfg, W, tokens)
    return _final_norm(cfg, W, h) @ W["lm_head.weight"].T, margin


def reference_mtp_logits(
    config: dict, weights: dict, tokens: np.ndarray, variant: str = "pre_norm"
) -> list[np.ndarray]:
    """Teacher-forced logits of the MTP chain (spec §3); one array per module.

    Module k (layer ``L = num_hidden_layers + k``) at row t combines
    ``e = enorm(embed(tokens[t+k+1]))`` with ``hnorm(h_prev[t])``, where ``h_prev``
    is the trunk hidden (pre-final-norm for ``variant="pre_norm"``, after the
    final norm for ``"post_norm"``) for k = 0 and module k-1's decoder-layer output
    for k > 0; ``z = eh_proj(concat[e, hprev])`` (embedding half first) runs
    through decoder layer L with that layer's own settings (attention type,
    heads, rope theta / partial rotary / scaling, clamps, dense or MoE MLP), and
    ``logits_k = shared_head.output(shared_head.norm(z))``. Row t of module k thus
    predicts ``tokens[t+k+2]``.

    Rows t = 0..T-k-2 (``[T-k-1, vocab]``; empty ``[0, vocab]`` when T-k-1 <= 0)
    form a causal sequence. Positions (RoPE and the sliding-window mask): row t
    of module k sits at position ``t+k+1``, the position of the token it embeds
    (vLLM/EAGLE convention, spec §3 [?]). In this cache-free reference the choice
    does not change results beyond rounding: the mask and RoPE scores depend only
    on position differences, which are the row differences either way.
    """
    if variant not in ("pre_norm", "post_norm"):
        raise ValueError("variant must be 'pre_norm' or 'post_norm'")
    cfg = _text_config(config)
    W = _Weights(weights)
    tokens = np.asarray(tokens).reshape(-1).astype(np.int64)
    T = tokens.shape[0]
    V = cfg["vocab_size"]
    n_trunk = cfg["num_hidden_layers"]
    eps = cfg.get("rms_norm_eps", 1e-5)
    zc = cfg.get("zero_centered", True)

    h, _ = _hidden(cfg, W, tokens)
    if variant == "post_norm":
        h = _final_norm(cfg, W, h)
    embed = W["model.embed_tokens.weight"]
    out: list[np.ndarray] = []
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        n = T - k - 1
        if n <= 0:
            out.append(np.zeros((0, V)))
            continue
        p = f"model.layers.{n_trunk + k}."
        e = rms_norm(embed[tokens[k + 1 : k + 1 + n]], W[p + "enorm.weight"], eps, zc)
        hp = rms_norm(h[:n], W[p + "hnorm.weight"], eps, zc)
        z = np.concatenate([e, hp], axis=-1) @ W[p + "eh_proj.weight"].T
        z, _ = _decoder_layer(cfg, W, n_trunk + k, z, np.arange(n, dtype=np.int64) + k + 1)
        head_in = rms_norm(z, W[p + "transformer.shared_head.norm.weight"], eps, zc)
        out.append(head_in @ W[p + "transformer.shared_head.output.weight"].T)
        h = z
    return out
