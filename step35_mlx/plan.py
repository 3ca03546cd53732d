"""Memory planner: what Step 3.5 Flash needs for a recipe, a context length and a KV format,
what this machine (or a common Mac) offers, and what to change when it does not fit.

Everything here is arithmetic on a config and a few numbers; nothing is loaded. The
functions that look at the machine (:func:`machine_memory`, :func:`set_wired_limit`) are
thin wrappers around pure ones that take the numbers as parameters (:func:`mac_machine`,
:func:`linux_machine`, :func:`verdict`), so tests simulate any machine.

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

Machine rule (macOS): the GPU may wire up to Metal's ``recommendedMaxWorkingSetSize``,
which MLX reports as ``max_recommended_working_set_size``; ``sudo sysctl
iogpu.wired_limit_mb=N`` raises it until reboot (0 = the default). Without Metal to ask,
the default is taken as 2/3 of RAM up to 32 GiB and 3/4 above (:func:`default_gpu_limit`):
the values llama.cpp's Metal backend logs on stock Macs -- 10,922.67 MiB on 16 GiB,
21,845.33 MiB on 32 GiB, 27 GiB on 36 GiB, 48 GiB on 64 GiB, 96 GiB on 128 GiB. Newer macOS
releases may allow more (107.52 GiB was measured on a 128 GiB Mac on macOS 26, reported in
antirez/ds4 #890 / #893), so the rule is conservative. Raising: we print ``N = RAM - 8
GiB`` (:data:`OS_RESERVE`), leaving 8 GiB for macOS and other apps.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import ModelConfig
from .mlx_lm_format import FolderFormat, read_folder

GB = 10**9
GiB = 1 << 30
MiB = 1 << 20

MAC_SIZES_GB = (64, 96, 128, 192, 256, 512)  # marketed sizes; the RAM is that many GiB
OS_RESERVE = 8 * GiB  # left to macOS when raising the GPU wired limit
SMALL_MAC = 32 * GiB  # up to this much RAM macOS lets the GPU wire 2/3, above it 3/4
OVERHEAD = 1 * GiB
KV_STEP = 256  # KVCache grows in steps of this many positions (cache.KVCache.step)
DEFAULT_SLACK = 8  # model.DEFAULT_SLACK: extra ring slots for exact rollback
FLOAT_RECIPE = "bf16"

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1,
          "I32": 4, "I64": 8, "U16": 2, "I16": 2, "BOOL": 1, "F64": 8, "U64": 8}


class InsufficientMemoryError(ValueError):
    """The model does not fit; ``options`` lists changes that would make it fit (each checked)."""

    def __init__(self, message: str, plan: "MemoryPlan", machine: "MachineMemory", options: list["FitOption"]):
        super().__init__(message)
        self.plan = plan
        self.machine = machine
        self.options = options


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightSizes:
    """Bytes the weights occupy once loaded: ``trunk`` and ``mtp`` (all MTP modules with their heads).

    ``upcast`` is included in the two totals: the extra bytes of norms and routers the
    loader keeps in float32 although the file stores them in 16 bits.
    """

    trunk: int
    mtp: int
    label: str
    recipe: str | None = None
    upcast: int = 0
    measured: bool = False  # from a folder's files rather than computed from a config
    vision: int = 0  # of ``trunk``: a Step 3.7 vision tower (encoder, downsamplers, projector)

    def total(self, mtp: bool) -> int:
        return self.trunk + (self.mtp if mtp else 0)


def model_config(config: ModelConfig | dict) -> ModelConfig:
    return config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)


def _is_mtp(name: str) -> bool:
    return name.startswith("model.mtp.")


def _upcast_bytes(name: str, shape: Iterable[int], dtype: str) -> int:
    """Extra bytes when the loader turns this 16-bit tensor into float32: the router
    ``moe.gate.weight`` and norm weights (the rule of ``loader._cast``)."""
    if dtype not in ("BF16", "F16"):
        return 0
    norm = name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]
    if not (name.endswith(".moe.gate.weight") or norm):
        return 0
    return 2 * math.prod(int(d) for d in shape)


def weight_sizes(config: ModelConfig | dict, recipe: Any = "q4", *, source_dtype: str = "BF16") -> WeightSizes:
    """In-memory weight bytes of ``config`` under ``recipe``.

    ``recipe``: a recipe name (``q8``, ``q6``, ``q4``, ``q3-mixed``, ``q2-mixed``), a
    :class:`~step35_mlx.quant.recipes.Recipe`, ``"bf16"`` (unquantized), a converted
    checkpoint's ``quantization`` block (dict), or a :class:`WeightSizes` (returned as is).
    """
    from .quant.recipes import Recipe, expected_tensors, get_recipe, plan_sizes, source_dtype_for

    if isinstance(recipe, WeightSizes):
        return recipe
    cfg = model_config(config)
    tensors = expected_tensors(cfg, mtp=True)
    upcast_trunk = upcast_mtp = 0
    for name, shape in tensors:
        n = _upcast_bytes(name, shape, source_dtype_for(name, source_dtype))
        if _is_mtp(name):
            upcast_mtp += n
        else:
            upcast_trunk += n
    vision_tensors = [(n_, shape) for n_, shape in tensors if n_.startswith("vision.")]
    if isinstance(recipe, dict):
        trunk, mtp = _block_sizes(tensors, recipe, source_dtype)
        vision = _block_sizes(vision_tensors, recipe, source_dtype)[0]
        name = (cfg.raw.get("step35_mlx") or {}).get("recipe") or "converted"
        label = name
    elif isinstance(recipe, str) and recipe.lower() in (FLOAT_RECIPE, "float", "none"):
        trunk = mtp = 0
        for n_, shape in tensors:
            b = _BYTES[source_dtype_for(n_, source_dtype)] * math.prod(shape)
            if _is_mtp(n_):
                mtp += b
            else:
                trunk += b
        vision = sum(_BYTES[source_dtype] * math.prod(shape) for _, shape in vision_tensors)
        name = label = FLOAT_RECIPE
    else:
        r = recipe if isinstance(recipe, Recipe) else get_recipe(str(recipe))
        sizes = plan_sizes(cfg, r, mtp=True, source_dtype=source_dtype)
        trunk, mtp, vision = sizes["trunk"], sizes["mtp"], sizes["vision"]
        name = label = r.name
    return WeightSizes(trunk + upcast_trunk, mtp + upcast_mtp, label, name, upcast_trunk + upcast_mtp,
                       vision=vision)


def _block_sizes(tensors, block: dict, source_dtype: str) -> tuple[int, int]:
    """Bytes per (trunk, mtp) for a converted checkpoint's ``quantization`` block (as the loader reads it)."""
    from .quant.recipes import QuantSpec, output_tensors, source_dtype_for, tensor_bytes

    default = QuantSpec(int(block.get("bits", 4)), int(block.get("group_size", 64)))
    trunk = mtp = 0
    for name, shape in tensors:
        spec = None
        if name.endswith(".weight") and len(shape) >= 2:
            entry = block.get(name[: -len(".weight")], default)
            if entry is False:
                spec = None
            elif isinstance(entry, dict):
                spec = QuantSpec(int(entry.get("bits", default.bits)), int(entry.get("group_size", default.group_size)))
            else:
                spec = entry  # not listed: the global spec, as the loader applies it
        n = tensor_bytes(output_tensors(name, shape, source_dtype_for(name, source_dtype), spec))
        if _is_mtp(name):
            mtp += n
        else:
            trunk += n
    return trunk, mtp


def load_dtype_bytes() -> int | None:
    """Bytes per float the loader casts weights (and so activations) to by default: 4 on the
    CPU device, where ``loader.load_model`` loads float32 because MLX's bf16 CPU kernels are
    slow; ``None`` (the checkpoint's dtypes) on a GPU. Mirrors that loader rule."""
    import mlx.core as mx

    return 4 if mx.default_device() == mx.cpu else None


def _in_memory(name: str, shape, dtype: str, nbytes: int, dtype_bytes: int | None) -> tuple[int, int]:
    """(bytes once loaded, of which float32 upcast) for one stored tensor, following ``loader._cast``:
    norms and ``moe.gate.weight`` become float32, ``router_bias`` stays float32, other floating
    tensors take ``dtype_bytes`` when given."""
    from .loader import FP32_SUFFIXES

    n = math.prod(int(d) for d in shape)
    fp32 = name.endswith(FP32_SUFFIXES) or (
        name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2])
    if dtype not in ("F32", "F16", "BF16"):
        return nbytes, 0
    if fp32:
        return 4 * n, 4 * n - nbytes
    if dtype_bytes is not None:
        return dtype_bytes * n, 0
    return nbytes, 0


def folder_weight_sizes(path: str | Path, dtype_bytes: int | None = None, *,
                        folder_format: FolderFormat | None = None) -> WeightSizes:
    """Weight bytes of a checkpoint folder once loaded, from its safetensors headers.

    ``dtype_bytes``: the float width the loader casts to (``load_model(dtype=...)``, see
    :func:`load_dtype_bytes`); ``None`` keeps each tensor's stored dtype. Either way norms and
    the router count as float32, as the loader keeps them.
    """
    from .loader import hf_to_internal
    from .mlx_lm_format import original_name
    from .safetensors_io import SafetensorsFile
    from .vision.weights import is_vision_key

    path = Path(path)
    folder = folder_format or read_folder(path)
    cfg = folder.config
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    restore = folder.mlx_lm.restore_file if folder.mlx_lm else None
    replaced = set(SafetensorsFile(restore).tensors) if restore else set()  # float routers, exact norms
    trunk = mtp = upcast = vision = 0
    for f in files + ([restore] if restore else []):
        for info in SafetensorsFile(f).tensors.values():
            if is_vision_key(info.name):
                name = "vision." + info.name  # loaded (and counted) whole, as the loader does by default
            else:
                name = hf_to_internal(original_name(info.name) if folder.mlx_lm else info.name,
                                      cfg.num_hidden_layers)
            if name is None or (f != restore and name.rsplit(".", 1)[0] + ".weight" in replaced):
                continue
            n, extra = _in_memory(name, info.shape, info.dtype, info.nbytes, dtype_bytes)
            upcast += extra
            if _is_mtp(name):
                mtp += n
            else:
                trunk += n
                vision += n if name.startswith("vision.") else 0
    recipe = (cfg.raw.get("step35_mlx") or {}).get("recipe")
    if recipe is None and folder.mlx_lm:
        recipe = "mlx-lm " + ("/".join(map(str, folder.mlx_lm.weight_bits)) + "-bit" if folder.mlx_lm.weight_bits
                              else "float")
    if recipe is None:
        recipe = "quantized" if cfg.raw.get("quantization") else "float"
    return WeightSizes(trunk, mtp, f"{recipe} ({path.name})", recipe, upcast, measured=True, vision=vision)


def folder_activation_bytes(path: str | Path, dtype_bytes: int | None = None) -> int:
    """Bytes per activation element: ``dtype_bytes`` when the loader casts, else the folder's
    float dtype (its embedding scales or weight)."""
    from .safetensors_io import SafetensorsFile

    if dtype_bytes is not None:
        return dtype_bytes
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors = SafetensorsFile(f).tensors
        for key in ("model.embed_tokens.scales", "model.embed_tokens.weight",
                    "model.language_model.embed_tokens.scales", "model.language_model.embed_tokens.weight"):
            if key in tensors and tensors[key].dtype in ("F32", "F16", "BF16"):
                return _BYTES[tensors[key].dtype]
    return 2


# ----------------------------------------------------------------------------- KV arithmetic


def kv_token_bytes(kv_heads: int, head_dim: int, kv_bits: int | None = None, group_size: int = 64,
                   activation_dtype_bytes: int = 2) -> int:
    """Bytes one token takes in one layer's cache: K and V, float or quantized (packed + scale + bias per group)."""
    if kv_bits is None:
        per_head = head_dim * activation_dtype_bytes
    else:
        if head_dim % group_size:
            raise ValueError(f"head dim {head_dim} is not a multiple of the kv group size {group_size}")
        per_head = head_dim * kv_bits // 8 + 2 * (head_dim // group_size) * activation_dtype_bytes
    return 2 * kv_heads * per_head


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _layers(cfg: ModelConfig) -> tuple[list, list, list]:
    """(full trunk layers, sliding trunk layers, MTP layers) as LayerSpecs (cached on the config)."""
    key = (cfg.num_hidden_layers, cfg.num_nextn_predict_layers, tuple(cfg.layer_types))
    cached = cfg.__dict__.get("_plan_layers")
    if cached is not None and cached[0] == key:
        return cached[1]
    trunk = [cfg.layer(i) for i in range(cfg.num_hidden_layers)]
    mtp = [cfg.layer(cfg.num_hidden_layers + j) for j in range(cfg.num_nextn_predict_layers)]
    out = ([s for s in trunk if not s.is_sliding], [s for s in trunk if s.is_sliding], mtp)
    cfg.__dict__["_plan_layers"] = (key, out)
    return out


def _cache_bytes(spec, context: int, kv_bits, group, act, slack, window) -> int:
    tok = kv_token_bytes(spec.num_kv_heads, spec.head_dim, kv_bits, group, act)
    if spec.is_sliding:
        return tok * (window + slack)
    return tok * _round_up(context, KV_STEP) if context > 0 else 0


def _score_bytes(kv_bits, act: int, fused: bool, rows: int) -> tuple[int, bool, bool]:
    """(bytes per attention score element, mask materialised?, K/V dequantized?) for a chunk of ``rows``."""
    dequant_rows = _dequantize_prefill_rows()
    if kv_bits is not None and not (dequant_rows is not None and rows > dequant_rows):
        # quantized_sdpa: scores in the activation dtype, cast to float32 for the softmax
        # (in place afterwards), cast back; a float32 model skips the casts.
        return (4 if act == 4 else act + 4), True, False
    dequant = kv_bits is not None
    if fused:
        return 0, False, dequant
    return act, True, dequant


def _dequantize_prefill_rows() -> int | None:
    from .layers import attention

    rows = getattr(attention, "DEQUANTIZE_PREFILL_ROWS", None)
    return int(rows) if rows is not None else None


def _attention_bytes(spec, rows: int, keys: int, kv_bits, group, act, fused, grow_old: int) -> dict:
    Hq, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    sb, mask, dequant = _score_bytes(kv_bits, act, fused, rows)
    out = {
        "projections": rows * (2 * Hq + 4 * Hkv) * D * act + rows * Hq * act,
        "scores": Hq * rows * keys * sb,
        # a causal mask built inside the unfused kernels (the sliding mask is counted once per forward)
        "mask": rows * keys if mask and not spec.is_sliding else 0,
        "dequantized_kv": 2 * Hkv * D * keys * act if dequant else 0,
    }
    if spec.is_sliding:
        # ring contents in position order concatenated with the new rows (K and V)
        out["ring_concat"] = kv_token_bytes(Hkv, D, kv_bits, group, act) * keys
    else:
        out["kv_growth"] = grow_old
    return out


def _ffn_bytes(cfg: ModelConfig, rows: int, act: int) -> dict:
    H = cfg.hidden_size
    moe = dense = 0
    if cfg.moe_layers:
        tk = rows * cfg.moe_top_k
        moe = (tk * H * (2 * act + 4) + 3 * tk * cfg.moe_intermediate_size * act
               + rows * cfg.moe_num_experts * 12 + rows * H * 4 + 3 * rows * cfg.share_expert_dim * act)
    if len(cfg.moe_layers) < cfg.num_layers_total:
        dense = 3 * rows * cfg.intermediate_size * act
    return {"moe": moe, "dense_mlp": dense}


def activation_bytes(cfg: ModelConfig, context: int, *, prefill_step: int = 512, kv_bits=None,
                     kv_group_size: int = 64, activation_dtype_bytes: int = 2, batch: int = 1,
                     fused_attention: bool = True, mtp: bool = True, slack: int = DEFAULT_SLACK) -> dict:
    """Peak transient bytes (see the module docstring) and its breakdown, for the larger of the
    last prefill chunk and an MTP verify step. Keys: ``total``, ``phase``, ``rows`` and the parts."""
    act = activation_dtype_bytes
    window = cfg.sliding_window
    C = window + slack
    full, sliding, mtp_layers = _layers(cfg)
    n_mtp = len(mtp_layers) if mtp else 0
    best: dict | None = None
    decode_rows = n_mtp + 1  # one token, or an MTP verify of the pending token + n_mtp drafts
    phases = [("prefill", max(1, min(prefill_step, context)), 1),
              ("verify" if n_mtp else "decode", max(1, min(decode_rows, context)), decode_rows)]
    for phase, T, logit_rows in phases:
        before = max(context - T, 0)
        layer_parts = []
        for spec in ([full[0]] if full else []) + ([sliding[0]] if sliding else []) + mtp_layers[:n_mtp][:1]:
            if spec.is_sliding:
                keys = (min(before, C) + T) if not T <= slack + 1 else min(before + T, C)
                grow = 0
            else:
                keys = context
                tok = kv_token_bytes(spec.num_kv_heads, spec.head_dim, kv_bits, kv_group_size, act)
                old = _round_up(before, KV_STEP) if before > 0 else 0
                grow = tok * old if _round_up(context, KV_STEP) > old else 0
            parts = _attention_bytes(spec, T, keys, kv_bits, kv_group_size, act, fused_attention, grow)
            layer_parts.append((f"attention ({'sliding' if spec.is_sliding else 'full'})", parts))
        ffn = _ffn_bytes(cfg, T, act)
        layer_parts += [(f"ffn ({k})", {k: v}) for k, v in ffn.items() if v]
        biggest_name, biggest = max(layer_parts, key=lambda kv: sum(kv[1].values()))
        stream = 8 * T * cfg.hidden_size * act
        if sliding and T > 1:  # model._masks: one boolean window mask per forward, shared by sliding layers
            stream += T * ((min(before, C) + T) if T > slack + 1 else min(before + T, C))
        logits = logit_rows * cfg.vocab_size * (4 + act)
        total = batch * (stream + sum(biggest.values()) + logits)
        result = {"total": total, "phase": phase, "rows": T, "stream": batch * stream, "logits": batch * logits,
                  "largest_layer": biggest_name, **{k: batch * v for k, v in biggest.items()}}
        if best is None or total > best["total"]:
            best = result
    return best


# ----------------------------------------------------------------------------- plans


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
        full, sliding, mtp_layers = _layers(cfg)
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
             f"{_round_up(self.context, KV_STEP):,} (context rounded up to {KV_STEP})"),
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


def _with_image_encoding(cfg: ModelConfig, acts: dict, act: int, fused_attention: bool) -> dict:
    """A Step 3.7 model encodes images one view at a time before their prefill chunk: the peak is the larger."""
    from .vision.config import VisionConfig
    from .vision.costs import view_cost

    vcfg = VisionConfig.from_config(cfg.raw)
    if vcfg is None:
        return acts
    view = view_cost(vcfg, vcfg.image_size, act, fused_attention)
    if view.activation_bytes <= acts["total"]:
        return acts
    return {"total": view.activation_bytes, "phase": "image encoding", "rows": view.patches,
            "largest_layer": f"vision encoder ({vcfg.image_size}x{vcfg.image_size} view)"}


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
    full, sliding, mtp_layers = _layers(cfg)
    mtp = bool(mtp and mtp_layers and w.mtp > 0)
    full_kv = batch * sum(_cache_bytes(s, context, kv_bits, kv_group_size, act, slack, window) for s in full)
    sliding_kv = batch * sum(_cache_bytes(s, context, kv_bits, kv_group_size, act, slack, window) for s in sliding)
    mtp_kv = batch * sum(_cache_bytes(s, context, kv_bits, kv_group_size, act, slack, window)
                         for s in mtp_layers) if mtp else 0
    per_token = sum(kv_token_bytes(s.num_kv_heads, s.head_dim, kv_bits, kv_group_size, act) for s in full)
    acts = activation_bytes(cfg, context, prefill_step=prefill_step, kv_bits=kv_bits, kv_group_size=kv_group_size,
                            activation_dtype_bytes=act, batch=batch, fused_attention=fused_attention, mtp=mtp,
                            slack=slack)
    acts = _with_image_encoding(cfg, acts, act, fused_attention)
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
    lo, hi = 1, cap  # need(lo) fits, need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan.replan(context=mid).total <= limit:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------- machines


@dataclass(frozen=True)
class MachineMemory:
    """``total``: physical RAM (or GPU memory on CUDA); ``gpu_limit``: what the model may use now."""

    total: int
    gpu_limit: int
    source: str
    kind: str = "mac"  # "mac", "cuda", "linux" or "other"
    name: str = "this machine"
    wired_limit_mb: int = 0  # iogpu.wired_limit_mb (0 = macOS default)

    @property
    def is_mac(self) -> bool:
        return self.kind == "mac"

    @property
    def raise_target(self) -> int | None:
        """The GPU limit after the suggested ``sysctl`` (macOS only): RAM minus :data:`OS_RESERVE`."""
        return self.total - OS_RESERVE if self.is_mac else None


def default_gpu_limit(total: int) -> int:
    """macOS's default GPU wired limit without Metal to ask: 2/3 of RAM up to 32 GiB, 3/4 above."""
    return total * 2 // 3 if total <= SMALL_MAC else total * 3 // 4


def mac_machine(ram_gib: float, *, wired_limit_mb: int = 0, recommended: int | None = None,
                name: str | None = None) -> MachineMemory:
    """A Mac with ``ram_gib`` GiB: Metal's recommended working set if given, else a set
    ``iogpu.wired_limit_mb``, else :func:`default_gpu_limit`."""
    total = int(ram_gib * GiB)
    if recommended:
        limit, source = int(recommended), "Metal's recommended working set"
    elif wired_limit_mb:
        limit, source = int(wired_limit_mb) * MiB, f"iogpu.wired_limit_mb={wired_limit_mb}"
    else:
        limit = default_gpu_limit(total)
        source = f"macOS default: {'2/3' if total <= SMALL_MAC else '3/4'} of RAM"
    return MachineMemory(total, limit, source, "mac", name or f"{ram_gib:g} GB Mac", int(wired_limit_mb))


def linux_machine(meminfo: str, *, cuda: dict | None = None, name: str = "this machine") -> MachineMemory:
    """From ``/proc/meminfo`` text; with ``cuda`` (an ``mx.device_info()`` dict) the GPU's memory."""
    fields = {}
    for line in meminfo.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            fields[m.group(1)] = int(m.group(2)) * 1024
    total = fields.get("MemTotal", 0)
    if cuda:
        dev_total = int(cuda.get("total_memory") or cuda.get("memory_size") or 0)
        free = cuda.get("free_memory")
        if dev_total:
            limit = int(free) if free else dev_total
            return MachineMemory(dev_total, limit, "CUDA device " + ("free memory" if free else "memory"),
                                 "cuda", name)
    available = fields.get("MemAvailable", total)
    return MachineMemory(total, available, "/proc/meminfo MemAvailable", "linux", name)


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _device_info() -> dict:
    import mlx.core as mx

    fn = getattr(mx, "device_info", None) or getattr(mx.metal, "device_info", None)
    try:
        return dict(fn()) if fn else {}
    except Exception:  # noqa: BLE001 - no GPU device
        return {}


def _metal_available() -> bool:
    import mlx.core as mx

    try:
        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001
        return False


def _cuda_available() -> bool:
    import mlx.core as mx

    try:
        return bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def machine_memory() -> MachineMemory:
    """What this machine offers: macOS (sysctl + Metal), Linux (/proc/meminfo, CUDA), else total RAM."""
    if sys.platform == "darwin":
        total = int(_sysctl("hw.memsize") or 0)
        if not total:
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                total = 0
        wired = int(_sysctl("iogpu.wired_limit_mb") or 0)
        rec = _device_info().get("max_recommended_working_set_size") if _metal_available() else None
        m = mac_machine(total / GiB, wired_limit_mb=wired, recommended=rec, name="this Mac")
        return m
    if sys.platform.startswith("linux"):
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            meminfo = ""
        cuda = _device_info() if _cuda_available() else None
        return linux_machine(meminfo, cuda=cuda)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return MachineMemory(total, total, "physical RAM", "other")


def fused_attention_available() -> bool:
    """Whether float-KV attention runs MLX's fused kernel here (a GPU device), i.e. no score matrix."""
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def set_wired_limit(nbytes: int) -> int | None:
    """On macOS with Metal, keep up to ``nbytes`` of MLX memory wired (capped at Metal's
    recommended working set, above which MLX raises); returns the previous limit. No-op
    (``None``) elsewhere."""
    import mlx.core as mx

    if sys.platform != "darwin" or not _metal_available():
        return None
    cap = _device_info().get("max_recommended_working_set_size")
    limit = int(min(nbytes, cap)) if cap else int(nbytes)
    fn = getattr(mx, "set_wired_limit", None) or mx.metal.set_wired_limit
    return fn(max(limit, 0))


# ----------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    status: str  # "fits", "raise" (fits after raising the wired limit), "no"
    need: int
    limit: int
    raised_limit: int | None = None
    command: str | None = None

    @property
    def fits(self) -> bool:
        return self.status == "fits"


def sysctl_command(machine: MachineMemory) -> str:
    """``sudo sysctl iogpu.wired_limit_mb=N`` with N = RAM - 8 GiB, in MiB."""
    return f"sudo sysctl iogpu.wired_limit_mb={(machine.total - OS_RESERVE) // MiB}"


def verdict(need: int, machine: MachineMemory) -> Verdict:
    """fits (under the current GPU limit) / raise (a Mac, under RAM - 8 GiB) / no."""
    if need <= machine.gpu_limit:
        return Verdict("fits", need, machine.gpu_limit)
    target = machine.raise_target
    if target is not None and target > machine.gpu_limit and need <= target:
        return Verdict("raise", need, machine.gpu_limit, target, sysctl_command(machine))
    return Verdict("no", need, machine.gpu_limit, target)


def common_macs() -> list[MachineMemory]:
    return [mac_machine(gb) for gb in MAC_SIZES_GB]


# ----------------------------------------------------------------------------- check_fit


@dataclass(frozen=True)
class FitOption:
    """One change that makes the plan fit: ``flag`` for the command line, ``changes`` for
    :meth:`MemoryPlan.replan` (``sysctl`` options change the machine instead: ``limit``)."""

    flag: str
    text: str
    changes: dict
    need: int
    limit: int | None = None  # the GPU limit this option assumes, when it changes the machine


def _fmt_gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def fit_options(plan: MemoryPlan, machine: MachineMemory) -> list[FitOption]:
    """Changes that would make ``plan`` fit ``machine``, each verified by recomputing the plan."""
    limit = machine.gpu_limit
    opts: list[FitOption] = []
    from .quant.recipes import RECIPES

    current = plan.weights + plan.mtp_weights
    m = max_context(plan, limit)
    for name in RECIPES:
        try:
            p = plan.replan(recipe=name)
        except ValueError:
            continue
        if p.weights + p.mtp_weights >= current:
            continue
        size = _fmt_gb(p.weights + p.mtp_weights)
        if p.total <= limit:
            opts.append(FitOption(f"--recipe {name}", f"a {name} conversion ({size} of weights; needs "
                                  f"{_fmt_gb(p.total)}): step35-mlx convert --recipe {name}",
                                  {"recipe": name}, p.total))
        else:
            mr = max_context(p, limit)
            if mr > m:
                opts.append(FitOption(f"--recipe {name} --max-context {mr}",
                                      f"a {name} conversion ({size} of weights) with --max-context {mr}",
                                      {"recipe": name, "context": mr}, p.replan(context=mr).total))
    if 0 < m < plan.context:
        opts.append(FitOption(f"--max-context {m}", f"--max-context {m} (the longest context that fits)",
                              {"context": m}, plan.replan(context=m).total))
    kv_fits = False
    for bits in (8, 4):
        if plan.kv_bits is not None and bits >= plan.kv_bits:
            continue
        try:
            p = plan.replan(kv_bits=bits)
        except ValueError:  # a head dim the kv group size does not divide
            break
        if p.total <= limit:
            kv_fits = True
            opts.append(FitOption(f"--kv-bits {bits}", f"--kv-bits {bits} (full-layer KV {_fmt_gb(plan.full_kv)} "
                                  f"-> {_fmt_gb(p.full_kv)}; needs {_fmt_gb(p.total)})", {"kv_bits": bits}, p.total))
            break
    p4 = None
    if not kv_fits and plan.kv_bits != 4:
        try:
            p4 = plan.replan(kv_bits=4)
        except ValueError:
            p4 = None
    if p4 is not None:
        m4 = max_context(p4, limit)
        if m4 > m and m4 > 0:
            opts.append(FitOption(f"--kv-bits 4 --max-context {m4}", f"--kv-bits 4 --max-context {m4}",
                                  {"kv_bits": 4, "context": m4}, p4.replan(context=m4).total))
    if plan.mtp and plan.mtp_weights:
        p = plan.replan(mtp=False)
        if p.total <= limit:
            opts.append(FitOption("--no-mtp", f"--no-mtp (frees {_fmt_gb(plan.total - p.total)})",
                                  {"mtp": False}, p.total))
    if plan.prefill_step > 1 and plan.activations > 0.05 * plan.total:
        lo, hi = 0, plan.prefill_step  # largest step in [1, prefill_step) that fits
        if plan.replan(prefill_step=1).total <= limit:
            lo = 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if plan.replan(prefill_step=mid).total <= limit:
                    lo = mid
                else:
                    hi = mid
            opts.append(FitOption(f"--prefill-step {lo}", f"--prefill-step {lo} (smaller prefill chunks; "
                                  f"activations {_fmt_gb(plan.activations)} -> "
                                  f"{_fmt_gb(plan.replan(prefill_step=lo).activations)})",
                                  {"prefill_step": lo}, plan.replan(prefill_step=lo).total))
    v = verdict(plan.total, machine)
    if v.status == "raise":
        opts.append(FitOption(v.command, f"raise the GPU wired limit to {_fmt_gb(v.raised_limit)} "
                              f"(until reboot; leaves {OS_RESERVE // GiB} GiB to macOS): {v.command}",
                              {}, plan.total, v.raised_limit))
    return opts


def check_fit(plan: MemoryPlan, machine: MachineMemory | None = None) -> None:
    """Return if ``plan`` fits ``machine`` (default: this one); else raise
    :class:`InsufficientMemoryError` listing the options that would make it fit."""
    machine = machine or machine_memory()
    if plan.total <= machine.gpu_limit:
        return
    opts = fit_options(plan, machine)
    head = (f"{plan.recipe} with {plan.context:,} tokens of context (KV {plan.kv_label}, MTP "
            f"{'on' if plan.mtp else 'off'}) needs {_fmt_gb(plan.total)}, but {machine.name} can give it "
            f"{_fmt_gb(machine.gpu_limit)} ({machine.source}).")
    if opts:
        body = "\nAny one of these would make it fit:\n" + "\n".join(f"  - {o.text}" for o in opts)
    else:
        body = (f"\nNothing fits: the smallest recipe's weights alone are too large for "
                f"{_fmt_gb(machine.gpu_limit)}.")
    raise InsufficientMemoryError(head + body, plan, machine, opts)


# ----------------------------------------------------------------------------- load-time check

MIN_CONTEXT = 4096  # the shortest context an automatic limit may pick before refusing to load


def _kv_group(cfg: ModelConfig, kv_bits: int | None, kv_group_size: int | None) -> int:
    """``decode.new_cache``'s rule: 64, or 32 when 64 does not divide every head dim."""
    if kv_group_size is not None:
        return kv_group_size
    if kv_bits is None:
        return 64
    dims = {cfg.head_dim, cfg.sliding_head_dim or cfg.head_dim}
    return 64 if all(d % 64 == 0 for d in dims) else 32


def preflight(path: str | Path, *, context: int | None = None, kv_bits: int | None = None,
              kv_group_size: int | None = None, mtp: bool = True, prefill_step: int = 512,
              machine: MachineMemory | None = None, min_context: int = MIN_CONTEXT,
              wire: bool = True, dtype_bytes: int | None | str = "auto",
              folder_format: FolderFormat | None = None, prefix_cache: int = 0) -> MemoryPlan:
    """Check, before loading ``path``, that it fits this machine (or ``machine``); return the plan.

    Weights come from the folder's safetensors headers, at the float width the loader will
    use (``dtype_bytes``; ``"auto"``: :func:`load_dtype_bytes`). With ``context`` ``None`` the plan
    takes the longest context that fits (at most the model's maximum); the caller should
    use ``plan.context`` as its context limit. Raises :class:`InsufficientMemoryError` (a
    ``ValueError``, with the options) when the requested context -- or, automatically, not
    even ``min_context`` tokens -- fits. On macOS with Metal it then wires the planned bytes
    (:func:`set_wired_limit`; ``wire=False`` skips that). ``folder_format``: the folder's
    :func:`~step35_mlx.mlx_lm_format.read_folder` reading when the caller already has it.
    ``prefix_cache``: the prefix cache's RAM budget in bytes, counted like the rest.
    """
    path = Path(path)
    folder = folder_format or read_folder(path)
    cfg = folder.config
    machine = machine or machine_memory()
    cap = cfg.max_position_embeddings
    # the same messages as settings.resolve_settings / decode.new_cache, which would refuse these later
    if context is not None and context > cap:
        raise ValueError(f"max_context {context} is larger than the model's {cap} positions")
    if context is not None and context < 1:
        raise ValueError(f"max_context must be >= 1, got {context}")
    if kv_bits not in (None, 4, 8):
        raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}")
    db = load_dtype_bytes() if dtype_bytes == "auto" else dtype_bytes
    kw = dict(recipe=folder_weight_sizes(path, db, folder_format=folder), kv_bits=kv_bits,
              kv_group_size=_kv_group(cfg, kv_bits, kv_group_size), mtp=mtp, prefill_step=prefill_step,
              activation_dtype_bytes=folder_activation_bytes(path, db), fused_attention=fused_attention_available(),
              prefix_cache=prefix_cache)
    if context is None:
        floor = plan_memory(cfg, context=min(min_context, cap), **kw)
        check_fit(floor, machine)
        context = max_context(floor, machine.gpu_limit)
    plan = plan_memory(cfg, context=context, **kw)
    check_fit(plan, machine)
    if wire:
        set_wired_limit(plan.total)
    return plan


# ----------------------------------------------------------------------------- helpers for the CLI


def parse_tokens(text: str) -> int:
    """``32768``, ``32K``, ``256k``, ``1M`` -> tokens (K = 1024)."""
    t = str(text).strip().replace(",", "").replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmM]?)", t)
    if not m:
        raise ValueError(f"cannot read context {text!r}; use a number of tokens like 32768 or 32K")
    mult = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def format_tokens(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    if n >= 1024:
        return f"{n / 1024:.1f}K"
    return str(n)


def parse_kv_bits(text: str | int | None) -> int | None:
    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("none", "off", "16", "bf16", "float", ""):
        return None
    if t in ("8", "4"):
        return int(t)
    raise ValueError(f"--kv-bits must be none, 8 or 4, got {text!r}")


__all__ = [
    "GB", "GiB", "MiB", "MAC_SIZES_GB", "OS_RESERVE", "OVERHEAD", "InsufficientMemoryError", "WeightSizes",
    "weight_sizes", "folder_weight_sizes", "folder_activation_bytes", "kv_token_bytes", "activation_bytes",
    "MemoryPlan", "plan_memory", "max_context", "MachineMemory", "default_gpu_limit", "mac_machine",
    "linux_machine", "machine_memory", "fused_attention_available", "set_wired_limit", "Verdict", "verdict",
    "sysctl_command", "common_macs", "FitOption", "fit_options", "check_fit", "parse_tokens", "format_tokens",
    "parse_kv_bits", "preflight", "MIN_CONTEXT", "load_dtype_bytes",
]
