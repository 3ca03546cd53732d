"""A memory plan: weights, KV caches, activations and overhead for one set of settings.

Parts of a plan (bytes; ``GB`` below = 1e9 bytes):

* **weights** -- the trunk, plus the MTP modules when MTP is on. From
  :func:`step35_mlx.quant.recipes.plan_sizes` for a recipe, from the ``quantization``
  block of a converted checkpoint's config, or from a folder's real safetensors sizes.
  The loader keeps norms and the router (``moe.gate``) in float32 whatever the file holds,
  so 16-bit copies of those count twice their file size (+0.10 GB for the release).
* **full-layer KV** -- ``KVCache`` per full-attention layer: K and V, ``kv_heads x head_dim``
  per token, the activation dtype (bf16: 2 B) or quantized (``bits/8`` B per element plus
  one scale and one bias per ``group_size`` elements in the activation dtype). The cache
  allocates in steps of 256 positions, so the plan counts ``ceil(context / 256) x 256``.
  Release, bf16: 12 layers x 2 x 8 x 128 x 2 B = **49,152 B/token** (spec §7).
* **sliding KV** -- ``SlidingKVCache`` rings hold ``window + slack`` slots (512 + 8 = 520 for
  the release), allocated whole on first use: fixed, whatever the context. Spec §7 counts
  33 x 512 x 4,096 B = 66 MiB; ours is 33 x 520 x 4,096 B = 67.0 MiB.
* **MTP KV** -- one cache per MTP module by its own attention type (release: 3 sliding
  rings, 3 x 520 x 4,096 B).
* **activations** -- the largest transient working set, at the last prefill chunk
  (``T = min(prefill_step, context)`` new rows against ``context`` keys) or at an MTP verify
  step (``num_mtp + 1`` rows), whichever is larger. Intermediates of one layer are freed
  before the next layer runs, so it is the residual stream plus the largest of one layer's
  attention or FFN transients plus the logits:

  - stream: 8 x ``T x hidden`` -- the chunk's graph is evaluated at once (prefill only
    evaluates the caches), so hidden states of neighbouring layers are alive next to the
    current layer's transients (calibrated with ``benchmarks/bench_context_memory.py``) --
    plus the sliding-window mask ``T x (keys)`` (bool) built once per forward;
  - attention: projections ``T x (2 heads + 4 kv_heads) x head_dim + T x heads`` (q before /
    after RoPE, k, v, the head gate); attention scores ``heads x T x keys`` when the kernel
    is not fused -- 0 with MLX's fused ``scaled_dot_product_attention`` (Metal/CUDA, float
    KV), one activation-dtype copy in MLX's unfused fallback (CPU; the softmax reuses the
    buffer), and for our quantized-KV attention the activation-dtype scores plus their
    float32 copy for the softmax (6 B per score in bf16, 4 B in a float32 model) -- both
    measured with ``benchmarks/bench_context_memory.py``; a boolean mask ``T x keys`` when
    one is materialised; full layers add
    the old cache buffer while the ``KVCache`` grows (one layer at a time), sliding layers
    the ring contents concatenated with the new rows;
  - FFN: MoE rows ``T x top_k`` gathered to ``hidden`` and back (2 x activation dtype) plus
    the float32 weighted sum, three ``moe_intermediate`` tensors, the float32 router
    (logits, sigmoid, biased scores, float32 input) and the shared expert; dense layers
    three ``intermediate`` tensors;
  - logits: only the rows that need them -- the last prompt position in prefill, ``num_mtp
    + 1`` rows in an MTP verify -- ``rows x vocab`` in float32 and the activation dtype.
    (The trunk never computes ``[prefill_step, vocab]`` logits: prefill runs without the
    head.)

  When :mod:`step35_mlx.layers.attention` defines ``DEQUANTIZE_PREFILL_ROWS`` (quantized
  keys/values are dequantized for chunks longer than that and run through the fused
  kernel), the planner counts the dequantized K/V of one layer instead of the scores.
* **overhead** -- a fixed :data:`OVERHEAD` of 1 GiB: the MLX/Metal runtime (kernel
  libraries, command buffers), allocator rounding and free-list slack between
  ``mx.clear_cache`` calls, and the Python process with the tokenizer (unified memory: it
  shares the RAM). A round, deliberately generous figure, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import ModelConfig
from .activations import activation_bytes, with_image_encoding
from .kv import DEFAULT_SLACK, KV_STEP, cache_bytes, kv_token_bytes, layer_specs, round_up
from .units import GB, GiB
from .weights import WeightSizes, model_config, weight_sizes

OVERHEAD = 1 * GiB


@dataclass
class MemoryPlan:
    """A memory budget in bytes; ``total`` is what must fit under the machine's GPU limit."""

    config: ModelConfig = field(repr=False)
    weights_source: WeightSizes = field(repr=False)
    context: int
    kv_bits: int | None
    kv_group_size: int
    mtp: bool
    batch: int
    prefill_step: int
    activation_dtype_bytes: int
    fused_attention: bool
    slack: int
    weights: int
    mtp_weights: int
    full_kv: int
    sliding_kv: int
    mtp_kv: int
    activations: int
    overhead: int
    full_kv_per_token: int
    activation_detail: dict = field(default_factory=dict, repr=False)
    prefix_cache: int = 0  # the prefix cache's RAM budget (serve --cache-ram)

    @property
    def kv(self) -> int:
        return self.full_kv + self.sliding_kv + self.mtp_kv

    @property
    def total(self) -> int:
        return self.weights + self.mtp_weights + self.kv + self.activations + self.overhead + self.prefix_cache

    @property
    def recipe(self) -> str:
        return self.weights_source.recipe or self.weights_source.label

    @property
    def kv_label(self) -> str:
        if self.kv_bits is None:
            return {2: "bf16", 4: "float32"}.get(self.activation_dtype_bytes, f"{8 * self.activation_dtype_bytes}-bit")
        return f"{self.kv_bits}-bit g{self.kv_group_size}"

    def settings(self) -> dict:
        """The keyword arguments that rebuild this plan with :func:`plan_memory`."""
        return dict(recipe=self.weights_source, context=self.context, kv_bits=self.kv_bits,
                    kv_group_size=self.kv_group_size, mtp=self.mtp, batch=self.batch,
                    prefill_step=self.prefill_step, activation_dtype_bytes=self.activation_dtype_bytes,
                    fused_attention=self.fused_attention, slack=self.slack, overhead=self.overhead,
                    prefix_cache=self.prefix_cache)

    def replan(self, **changes) -> "MemoryPlan":
        """The same plan with some settings changed (``recipe`` may be a name: recomputed from the config)."""
        kw = self.settings()
        kw.update(changes)
        return plan_memory(self.config, **kw)

    def parts(self) -> list[tuple[str, int, str]]:
        """``[(name, bytes, how)]`` for tables."""
        cfg = self.config
        full, sliding, mtp_layers = layer_specs(cfg)
        C = cfg.sliding_window + self.slack
        a = self.activation_detail
        b = f"batch {self.batch} x " if self.batch != 1 else ""
        rows = [
            ("weights (trunk)", self.weights,
             f"{self.weights_source.label}" + (", files measured" if self.weights_source.measured else "")
             + (f"; incl. {self.weights_source.upcast / GB:.2f} GB norms/routers kept float32"
                if self.weights_source.upcast >= 0.005 * GB else "")
             + (f"; incl. vision tower {self.weights_source.vision / GB:.2f} GB"
                if self.weights_source.vision else "")),
            ("weights (MTP)", self.mtp_weights,
             f"{len(mtp_layers)} modules with their heads" if self.mtp else "MTP off: not loaded"),
            ("full-layer KV", self.full_kv,
             f"{b}{len(full)} layers, {self.kv_label}: {self.full_kv_per_token:,} B/token x "
             f"{round_up(self.context, KV_STEP):,} (context rounded up to {KV_STEP})"),
            ("sliding KV", self.sliding_kv,
             f"{b}{len(sliding)} rings x {C} slots (window {cfg.sliding_window} + slack {self.slack}), fixed"),
            ("MTP KV", self.mtp_kv,
             f"{b}{len(mtp_layers)} caches x {C} slots" if self.mtp and mtp_layers else "MTP off"),
            ("activations", self.activations,
             f"{a.get('phase', 'prefill')} of {a.get('rows', 0)} rows; largest: {a.get('largest_layer', '')}"
             + (f" (scores {a['scores'] / GB:.2f} GB)" if a.get("scores", 0) >= 0.01 * GB else "")),
            ("overhead", self.overhead, "MLX/Metal runtime, allocator slack, tokenizer (fixed)"),
        ]
        if self.prefix_cache:
            rows.append(("prefix cache", self.prefix_cache, "RAM budget of the prefix cache (--cache-ram)"))
        return rows

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe, "context": self.context, "kv_bits": self.kv_bits,
            "kv_group_size": self.kv_group_size, "mtp": self.mtp, "batch": self.batch,
            "prefill_step": self.prefill_step, "activation_dtype_bytes": self.activation_dtype_bytes,
            "weights": self.weights, "mtp_weights": self.mtp_weights, "full_kv": self.full_kv,
            "sliding_kv": self.sliding_kv, "mtp_kv": self.mtp_kv, "activations": self.activations,
            "overhead": self.overhead, "total": self.total, "full_kv_per_token": self.full_kv_per_token,
            "prefix_cache": self.prefix_cache,
        }


def plan_memory(config: ModelConfig | dict, *, recipe: Any = "q4", context: int, kv_bits: int | None = None,
                kv_group_size: int = 64, mtp: bool = True, batch: int = 1, prefill_step: int = 512,
                activation_dtype_bytes: int = 2, fused_attention: bool = True, slack: int = DEFAULT_SLACK,
                overhead: int = OVERHEAD, prefix_cache: int = 0) -> MemoryPlan:
    """The memory plan for ``config`` (see the module docstring for every part).

    ``recipe``: a recipe name, ``"bf16"``, a ``Recipe``, a converted checkpoint's
    ``quantization`` block, or measured :class:`WeightSizes` (:func:`folder_weight_sizes`).
    ``fused_attention``: whether attention runs MLX's fused kernel for float KV (True on
    Metal and CUDA; False on CPU, where MLX materialises the scores). ``prefix_cache``: bytes
    reserved for the prefix cache's RAM tier.
    """
    cfg = model_config(config)
    if kv_bits not in (None, 4, 8):
        raise ValueError(f"kv bits must be 4, 8 or None, got {kv_bits}")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if prefill_step < 1 or batch < 1:
        raise ValueError("prefill_step and batch must be >= 1")
    w = weight_sizes(cfg, recipe)
    act = activation_dtype_bytes
    window = cfg.sliding_window
    full, sliding, mtp_layers = layer_specs(cfg)
    mtp = bool(mtp and mtp_layers and w.mtp > 0)
    full_kv = batch * sum(cache_bytes(s, context, kv_bits, kv_group_size, act, slack, window) for s in full)
    sliding_kv = batch * sum(cache_bytes(s, context, kv_bits, kv_group_size, act, slack, window) for s in sliding)
    mtp_kv = batch * sum(cache_bytes(s, context, kv_bits, kv_group_size, act, slack, window)
                         for s in mtp_layers) if mtp else 0
    per_token = sum(kv_token_bytes(s.num_kv_heads, s.head_dim, kv_bits, kv_group_size, act) for s in full)
    acts = activation_bytes(cfg, context, prefill_step=prefill_step, kv_bits=kv_bits, kv_group_size=kv_group_size,
                            activation_dtype_bytes=act, batch=batch, fused_attention=fused_attention, mtp=mtp,
                            slack=slack)
    acts = with_image_encoding(cfg, acts, act, fused_attention)
    return MemoryPlan(
        config=cfg, weights_source=w, context=context, kv_bits=kv_bits, kv_group_size=kv_group_size, mtp=mtp,
        batch=batch, prefill_step=prefill_step, activation_dtype_bytes=act, fused_attention=fused_attention,
        slack=slack, weights=w.trunk, mtp_weights=w.mtp if mtp else 0, full_kv=full_kv, sliding_kv=sliding_kv,
        mtp_kv=mtp_kv, activations=acts["total"], overhead=overhead, full_kv_per_token=per_token,
        activation_detail=acts, prefix_cache=prefix_cache,
    )


def max_context(plan: MemoryPlan, limit: int) -> int:
    """Largest context (<= ``max_position_embeddings``) whose plan, other settings unchanged, fits ``limit``.

    The need never decreases with the context, so a bisection finds the exact boundary;
    0 when not even one token fits.
    """
    cap = plan.config.max_position_embeddings
    if plan.replan(context=cap).total <= limit:
        return cap
    if plan.replan(context=1).total > limit:
        return 0
    return largest_fitting(1, cap, lambda n: plan.replan(context=n).total <= limit)


def largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The largest ``n`` in ``[lo, hi)`` with ``fits(n)``, by bisection: ``fits(lo)`` holds and ``fits``
    turns false once past its boundary (the need of a plan never decreases with the setting)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
