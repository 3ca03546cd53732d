"""Weight bytes once loaded: computed from a config and a recipe, or measured from a folder's safetensors headers.

The loader keeps norms and the router (``moe.gate``) in float32 whatever the file holds, so
16-bit copies of those count twice their file size (+0.10 GB for the release).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..config import ModelConfig
from ..mlx_lm_format import FolderFormat, read_folder

FLOAT_RECIPE = "bf16"

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1,
          "I32": 4, "I64": 8, "U16": 2, "I16": 2, "BOOL": 1, "F64": 8, "U64": 8}


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
    from ..quant.recipes import Recipe, expected_tensors, get_recipe, plan_sizes, source_dtype_for

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
    from ..quant.recipes import QuantSpec, output_tensors, source_dtype_for, tensor_bytes

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
    from ..loader import FP32_SUFFIXES

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
    from ..loader import hf_to_internal
    from ..mlx_lm_format import original_name
    from ..safetensors_io import SafetensorsFile
    from ..vision.weights import is_vision_key

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
    from ..safetensors_io import SafetensorsFile

    if dtype_bytes is not None:
        return dtype_bytes
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors = SafetensorsFile(f).tensors
        for key in ("model.embed_tokens.scales", "model.embed_tokens.weight",
                    "model.language_model.embed_tokens.scales", "model.language_model.embed_tokens.weight"):
            if key in tensors and tensors[key].dtype in ("F32", "F16", "BF16"):
                return _BYTES[tensors[key].dtype]
    return 2
