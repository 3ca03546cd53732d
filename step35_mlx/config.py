"""Parse and validate a Step 3.5 Flash ``config.json`` (``step3p5``, or ``step3p7`` wrapping it).

The released config keeps per-layer arrays for the trunk *and* the MTP layers
(45 + 3 = 48 entries). We keep them whole: the MTP modules read their own
entries (attention type, heads, RoPE, clamps) instead of assuming them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"
ATTENTION_TYPES = (FULL, SLIDING)
SUPPORTED_MODEL_TYPES = ("step3p5", "step3p7")


@dataclass(frozen=True)
class LayerSpec:
    """Everything that varies per layer index, resolved from the per-layer arrays."""

    index: int
    attention_type: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rotary_dims: int
    rope_scaling: dict | None
    is_moe: bool
    swiglu_limit: float
    swiglu_limit_shared: float

    @property
    def is_sliding(self) -> bool:
        return self.attention_type == SLIDING


@dataclass
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_attention_groups: int
    head_dim: int
    intermediate_size: int
    layer_types: list[str]
    rope_theta: list[float]
    partial_rotary_factors: list[float]
    swiglu_limits: list[float]
    swiglu_limits_shared: list[float]
    moe_layers: frozenset[int]
    model_type: str = "step3p5"
    num_nextn_predict_layers: int = 0
    rms_norm_eps: float = 1e-5
    sliding_window: int = 512
    max_position_embeddings: int = 262144
    rope_scaling: dict | None = None
    yarn_only_types: list[str] | None = None
    sliding_num_heads: int | None = None
    sliding_num_kv_heads: int | None = None
    sliding_head_dim: int | None = None
    use_head_wise_attn_gate: bool = True
    moe_num_experts: int = 288
    moe_top_k: int = 8
    moe_intermediate_size: int = 1280
    share_expert_dim: int = 1280
    moe_router_scaling_factor: float = 3.0
    norm_expert_weight: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def num_layers_total(self) -> int:
        """Trunk layers plus MTP layers (length of the per-layer arrays)."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def layer(self, index: int) -> LayerSpec:
        """Resolve the settings of layer ``index`` (trunk or MTP)."""
        if not 0 <= index < self.num_layers_total:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers_total})")
        attn = self.layer_types[index]
        sliding = attn == SLIDING
        heads = self.sliding_num_heads if sliding and self.sliding_num_heads else self.num_attention_heads
        kv = self.sliding_num_kv_heads if sliding and self.sliding_num_kv_heads else self.num_attention_groups
        hd = self.sliding_head_dim if sliding and self.sliding_head_dim else self.head_dim
        scaled = self.rope_scaling is not None and (
            self.yarn_only_types is None or attn in self.yarn_only_types
        )
        return LayerSpec(
            index=index,
            attention_type=attn,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=hd,
            rope_theta=float(self.rope_theta[index]),
            rotary_dims=int(hd * self.partial_rotary_factors[index]),
            rope_scaling=self.rope_scaling if scaled else None,
            is_moe=index in self.moe_layers,
            swiglu_limit=float(self.swiglu_limits[index] or 0.0),
            swiglu_limit_shared=float(self.swiglu_limits_shared[index] or 0.0),
        )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelConfig":
        """Build and validate from a config.json dict; raises ``ValueError`` naming the bad field."""
        return _parse(config)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The step3p5 text-model dict: the config itself, or ``text_config`` for step3p7."""
    if not isinstance(config, dict):
        raise ValueError("config must be a JSON object")
    model_type = config.get("model_type")
    if model_type == "step3p7":
        inner = config.get("text_config")
        if not isinstance(inner, dict):
            raise ValueError("config field 'text_config' is missing for model_type 'step3p7'")
        return inner
    if model_type != "step3p5":
        raise ValueError(
            f"config field 'model_type' is {model_type!r}; step35-mlx supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def _require(cfg: dict, name: str, kind: type | tuple = int) -> Any:
    if name not in cfg:
        raise ValueError(f"config field '{name}' is required")
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"config field '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _type_name(kind: Any) -> str:
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object",
             list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, getattr(k, "__name__", str(k))) for k in kinds)


def _is(value: Any, kind: Any) -> bool:
    """``isinstance`` with JSON semantics: a bool is not a number, an int is a float."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _field(cfg: dict, name: str, default: Any, kind: Any, *, positive: bool = False, label: str | None = None) -> Any:
    """``cfg[name]`` (``default`` when absent or null) checked to be of ``kind`` (and > 0 if ``positive``)."""
    value = cfg.get(name)
    if value is None:
        return default
    label = label or name
    if not _is(value, kind):
        raise ValueError(f"config field '{label}' must be {_type_name(kind)}, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"config field '{label}' must be positive, got {value!r}")
    return value


def _per_layer(cfg: dict, name: str, n: int, default: Any, kind: Any = float, nullable: bool = False) -> list:
    """A per-layer array of ``n`` entries (trunk + MTP) of ``kind``; absent means ``default`` everywhere.

    One number for a numeric field applies to every layer (mlx-lm reads a scalar ``rope_theta`` so);
    any other non-list value is refused.
    """
    value = cfg.get(name)
    if value is None:
        return [default] * n
    if kind is float and _is(value, float):
        return [value] * n
    if not isinstance(value, list):
        raise ValueError(
            f"config field '{name}' must be a list of {n} per-layer values "
            f"(num_hidden_layers + num_nextn_predict_layers), got {value!r}"
        )
    if len(value) < n:
        raise ValueError(
            f"config field '{name}' has {len(value)} entries; expected {n} "
            f"(num_hidden_layers + num_nextn_predict_layers)"
        )
    for i, v in enumerate(value[:n]):
        if not (nullable and v is None) and not _is(v, kind):
            raise ValueError(f"config field '{name}[{i}]' must be {_type_name(kind)}, got {v!r}")
    return list(value[:n])


def _rope_scaling(cfg: dict) -> dict | None:
    rope_scaling = _field(cfg, "rope_scaling", None, dict)
    if rope_scaling is None:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind not in ("llama3", "default"):
        raise ValueError(f"config field 'rope_scaling.rope_type' is {kind!r}; only 'llama3' is supported")
    if kind == "default":
        return None
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        _field(rope_scaling, key, None, float, positive=True, label=f"rope_scaling.{key}")
    return rope_scaling


def _check_quantization(quant: Any) -> None:
    """The ``quantization`` block of a converted folder: global ``bits``/``group_size`` and per-module specs."""
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise ValueError(f"config field 'quantization' must be a JSON object, got {quant!r}")
    for key in ("bits", "group_size"):
        _field(quant, key, None, int, positive=True, label=f"quantization.{key}")
    _field(quant, "mode", None, str, label="quantization.mode")
    for path, spec in quant.items():
        if path in ("bits", "group_size", "mode"):
            continue
        if spec is False:
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"config field 'quantization.{path}' must be false or a JSON object, got {spec!r}")
        for key in ("bits", "group_size"):
            _field(spec, key, None, int, positive=True, label=f"quantization.{path}.{key}")


def _parse(config: dict[str, Any]) -> ModelConfig:
    cfg = text_config(config)
    model_type = config.get("model_type", "step3p5")
    hidden = _require(cfg, "hidden_size")
    n_layers = _require(cfg, "num_hidden_layers")
    vocab = _require(cfg, "vocab_size")
    heads = _require(cfg, "num_attention_heads")
    kv_heads = _require(cfg, "num_attention_groups")
    head_dim = cfg.get("head_dim", hidden // heads)
    intermediate = _require(cfg, "intermediate_size")
    n_mtp = cfg.get("num_nextn_predict_layers", 0) or 0
    if not _is(n_mtp, int) or n_mtp < 0:
        raise ValueError(f"config field 'num_nextn_predict_layers' must be a non-negative int, got {n_mtp!r}")
    for name, v in (("hidden_size", hidden), ("num_hidden_layers", n_layers), ("vocab_size", vocab),
                    ("num_attention_heads", heads), ("num_attention_groups", kv_heads),
                    ("head_dim", head_dim), ("intermediate_size", intermediate)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"config field '{name}' must be a positive int, got {v!r}")
    n = n_layers + n_mtp

    layer_types = cfg.get("layer_types")
    if layer_types is None:
        # Fallback of the reference implementations: even layers slide.
        layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    layer_types = _per_layer({"layer_types": layer_types}, "layer_types", n, None, str)
    for i, t in enumerate(layer_types):
        if t not in ATTENTION_TYPES:
            raise ValueError(
                f"config field 'layer_types[{i}]' is {t!r}; expected one of {', '.join(ATTENTION_TYPES)}"
            )

    rope_theta = _per_layer(cfg, "rope_theta", n, 10000.0)
    for i, t in enumerate(rope_theta):
        if not t > 0:
            raise ValueError(f"config field 'rope_theta[{i}]' must be positive, got {t!r}")
    partial = _per_layer(cfg, "partial_rotary_factors", n, 1.0)
    for i, p in enumerate(partial):
        if not 0 < p <= 1:
            raise ValueError(f"config field 'partial_rotary_factors[{i}]' must be in (0, 1], got {p!r}")
    limits = [float(x or 0.0) for x in _per_layer(cfg, "swiglu_limits", n, 0.0, nullable=True)]
    limits_shared = [float(x or 0.0) for x in _per_layer(cfg, "swiglu_limits_shared", n, 0.0, nullable=True)]

    other = _field(cfg, "attention_other_setting", {}, dict)
    if other and other.get("attention_type", SLIDING) != SLIDING:
        raise ValueError(
            f"config field 'attention_other_setting.attention_type' is {other.get('attention_type')!r}; "
            f"expected '{SLIDING}'"
        )
    s_heads, s_kv, s_hd = (
        _field(other, k, None, int, positive=True, label=f"attention_other_setting.{k}")
        for k in ("num_attention_heads", "num_attention_groups", "head_dim")
    )
    for name, h, k in (("num_attention_heads / num_attention_groups", heads, kv_heads),
                       ("attention_other_setting.num_attention_heads / num_attention_groups",
                        s_heads or heads, s_kv or kv_heads)):
        if k <= 0 or h % k != 0:
            raise ValueError(f"config fields {name}: {h} query heads do not divide into {k} kv heads")

    if _field(cfg, "use_moe", True, bool) is False:
        moe_layers: frozenset[int] = frozenset()
    elif cfg.get("moe_layers_enum"):
        try:
            moe_layers = frozenset(int(i) for i in str(cfg["moe_layers_enum"]).split(",") if i.strip())
        except ValueError as e:
            raise ValueError(f"config field 'moe_layers_enum' must be comma-separated ints: {e}") from e
        bad = [i for i in moe_layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"config field 'moe_layers_enum' names layers {sorted(bad)} outside the trunk [0, {n_layers})")
    else:
        moe_layers = frozenset(range(1, n_layers))
    top_k = _field(cfg, "moe_top_k", 8, int)
    n_experts = _field(cfg, "moe_num_experts", 288, int, positive=True)
    if moe_layers and not 0 < top_k <= n_experts:
        raise ValueError(f"config field 'moe_top_k' ({top_k}) must be in [1, moe_num_experts={n_experts}]")
    activation = cfg.get("moe_router_activation", "sigmoid")
    if moe_layers and activation != "sigmoid":
        raise ValueError(f"config field 'moe_router_activation' is {activation!r}; only 'sigmoid' is supported")
    if _field(cfg, "sink", False, bool):
        raise ValueError("config field 'sink' is true; attention sinks are not part of Step 3.5 and unsupported")

    eps = _field(cfg, "rms_norm_eps", 1e-5, float, positive=True)
    eos = config.get("eos_token_id", cfg.get("eos_token_id"))
    eos = [] if eos is None else [eos] if _is(eos, int) else eos
    if not isinstance(eos, list) or not all(_is(t, int) for t in eos):
        raise ValueError(f"config field 'eos_token_id' must be an int or a list of ints, got {eos!r}")
    bos = _field({"bos_token_id": config.get("bos_token_id", cfg.get("bos_token_id"))}, "bos_token_id", None, int)
    rope_scaling = _rope_scaling(cfg)
    yarn_only = _field(cfg, "yarn_only_types", None, list)
    if yarn_only is not None and not all(isinstance(t, str) for t in yarn_only):
        raise ValueError(f"config field 'yarn_only_types' must be a list of attention types, got {yarn_only!r}")
    window = cfg.get("sliding_window", 512)
    if not _is(window, int) or window <= 0:
        raise ValueError(f"config field 'sliding_window' must be a positive int, got {window!r}")
    _check_quantization(config.get("quantization"))

    return ModelConfig(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_nextn_predict_layers=n_mtp,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_attention_groups=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        layer_types=layer_types,
        rope_theta=[float(t) for t in rope_theta],
        partial_rotary_factors=[float(p) for p in partial],
        swiglu_limits=limits,
        swiglu_limits_shared=limits_shared,
        moe_layers=moe_layers,
        rms_norm_eps=float(eps),
        sliding_window=window,
        max_position_embeddings=_field(cfg, "max_position_embeddings", 262144, int, positive=True),
        rope_scaling=rope_scaling,
        yarn_only_types=yarn_only,
        sliding_num_heads=s_heads,
        sliding_num_kv_heads=s_kv,
        sliding_head_dim=s_hd,
        use_head_wise_attn_gate=_field(cfg, "use_head_wise_attn_gate", True, bool),
        moe_num_experts=n_experts,
        moe_top_k=top_k,
        moe_intermediate_size=_field(cfg, "moe_intermediate_size", 1280, int, positive=True),
        share_expert_dim=_field(cfg, "share_expert_dim", 1280, int, positive=True),
        moe_router_scaling_factor=float(_field(cfg, "moe_router_scaling_factor", 3.0, float)),
        norm_expert_weight=_field(cfg, "norm_expert_weight", True, bool),
        tie_word_embeddings=_field(cfg, "tie_word_embeddings", False, bool),
        bos_token_id=bos,
        eos_token_id=list(eos),
        raw=config,
    )
