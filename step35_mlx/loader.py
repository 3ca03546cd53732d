"""Load Step 3.5 Flash from a Hugging Face checkpoint folder, an MLX folder our converter wrote,
or an mlx-lm / mlx-community conversion (read as is, see ``mlx_lm_format``).

All formats go through one path: read the (sharded) safetensors lazily, map key
names (``hf_to_internal``), quantize the modules the config's ``quantization``
block names, check coverage strictly, then load. Norm weights are never shifted
here: they stay zero-centred and ``ZeroCenteredRMSNorm`` adds the 1.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .draft_config import load_draft_config
from .draft_quant import requantize_mtp
from .errors import CheckpointError
from .model import Model
from .mlx_lm_format import FolderFormat, read_folder
from .vision.config import VisionConfig
from .vision.loading import attach_vision, split_vision

INDEX_FILE = "model.safetensors.index.json"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_STEP37_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                    ("language_model.lm_head.", "lm_head."), ("language_model.", ""))
_VISION_PREFIXES = ("model.vision_model.", "model.vit_large_projector.", "vision_model.", "vit_large_projector.")
# Tensors kept in float32 whatever the load dtype: selection-only bias and the fp32 router
# (a quantized router's scales and biases too, so routing stays float32 arithmetic).
FP32_SUFFIXES = (".router_bias", ".moe.gate.weight", ".moe.gate.scales", ".moe.gate.biases")


def hf_to_internal(key: str, num_hidden_layers: int) -> str | None:
    """Map a checkpoint key to our parameter name; ``None`` for tensors we deliberately skip (vision).

    Idempotent: internal names map to themselves, so MLX folders we wrote load through it too.
    """
    if key.startswith(_VISION_PREFIXES):
        return None
    for old, new in _STEP37_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    m = _LAYER_KEY.match(key)
    if m and int(m.group(1)) >= num_hidden_layers:
        j = int(m.group(1)) - num_hidden_layers
        rest = m.group(2).replace("transformer.shared_head.", "shared_head.")
        key = f"model.mtp.{j}.{rest}"
    return key


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, validated against the index when there is one."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(
                f"{path} is missing shard(s) {', '.join(missing)} listed in {INDEX_FILE}; "
                "re-download or re-convert the checkpoint"
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint folder, loaded lazily; checks that the index matches the shards."""
    weights: dict[str, mx.array] = {}
    located: dict[str, str] = {}
    for f in shard_files(path):
        try:
            shard = mx.load(str(f))
        except Exception as e:  # MLX raises RuntimeError/ValueError variants for damaged files
            raise CheckpointError(
                f"shard {f.name} in {path} cannot be read ({e}); it is truncated or corrupt — "
                "re-download or re-convert it"
            ) from e
        for k, v in shard.items():
            if k in weights:
                raise CheckpointError(f"tensor {k} appears in both {located[k]} and {f.name}")
            weights[k] = v
            located[k] = f.name
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = [k for k, f in weight_map.items() if located.get(k) != f]
        if wrong:
            k = wrong[0]
            raise CheckpointError(
                f"{INDEX_FILE} says tensor {k} is in {weight_map[k]} but "
                + (f"it is in {located[k]}" if k in located else "no shard contains it")
                + f" ({len(wrong)} mismatched entries); the index does not match the shards"
            )
    return weights


def _quantization_predicate(quant: dict, weights: dict[str, mx.array]):
    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized"):
            return False
        if path in quant:
            spec = quant[path]
            return spec if spec is False else {"mode": quant.get("mode", "affine"), **spec}
        return f"{path}.scales" in weights

    return predicate


def _check_coverage(model: Model, weights: dict[str, mx.array]) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(weights[k].shape)}, model expects {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        problems.append(f"{len(wrong)} wrongly shaped tensor(s): {'; '.join(wrong[:8])}")
    if problems:
        raise CheckpointError("checkpoint does not match config.json: " + " | ".join(problems))


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    out = {}
    for k, v in weights.items():
        if not mx.issubdtype(v.dtype, mx.floating):
            out[k] = v
        elif k.endswith(FP32_SUFFIXES) or (k.endswith(".weight") and "norm" in k.rsplit(".", 2)[-2]):
            out[k] = v.astype(mx.float32)
        elif dtype is not None:
            out[k] = v.astype(dtype)
        else:
            out[k] = v
    return out


def load_model(path: str | Path, dtype: mx.Dtype | None = None, *, mtp: bool = True,
               folder_format: FolderFormat | None = None, vision: bool = True) -> Model:
    """Build the model from ``config.json`` and load every tensor (trunk, head and MTP layers).

    ``dtype`` casts floating weights (quantization scales and biases included), which sets
    the activation dtype. ``None`` keeps the checkpoint's (bf16) on a GPU and uses float32 on
    the CPU device, where MLX's bf16 kernels run about 10x slower. Norms, the router and
    ``router_bias`` stay float32. ``mtp=False`` leaves the MTP modules out (their tensors
    are never read), saving their memory. ``folder_format``: the folder's
    :func:`~step35_mlx.mlx_lm_format.read_folder` reading when the caller already has it. A Step 3.7
    checkpoint's vision tower becomes ``model.vision`` unless ``vision=False`` (its tensors are then
    skipped). The folder's ``draft.json`` may requantize the MTP modules (:mod:`step35_mlx.draft_config`).
    Raises ``CheckpointError`` naming any missing, unexpected or wrongly shaped tensor.
    """
    path = Path(path)
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    folder = folder_format or read_folder(path)  # an mlx-lm conversion gets its real MTP count and our names
    config = folder.config
    if not mtp and config.num_nextn_predict_layers:
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    draft = load_draft_config(path) if config.num_nextn_predict_layers else None
    raw = read_weights(path)
    if folder.mlx_lm is not None:
        raw = folder.mlx_lm.to_checkpoint(raw)
    raw, vision_weights = split_vision(raw, keep=vision and VisionConfig.from_config(config.raw) is not None)
    weights: dict[str, mx.array] = {}
    for k, v in raw.items():
        name = hf_to_internal(k, config.num_hidden_layers)
        if name is not None and (mtp or not name.startswith("model.mtp.")):
            weights[name] = v
    model = Model(config)
    if vision and attach_vision(model, config.raw, vision_weights):
        weights.update(vision_weights)
    quant = config.raw.get("quantization")
    if quant:
        nn.quantize(
            model,
            group_size=quant.get("group_size", 64),
            bits=quant.get("bits", 4),
            mode=quant.get("mode", "affine"),
            class_predicate=_quantization_predicate(quant, weights),
        )
    _check_coverage(model, weights)
    model.load_weights(list(_cast(weights, dtype).items()), strict=True)
    mx.eval(model.parameters())
    if draft is not None and (draft.head_bits or draft.layer_bits):
        requantize_mtp(model, draft.head_bits, draft.layer_bits)
    model.eval()
    model.source_path = path
    model.load_notice = folder.mlx_lm.notice() if folder.mlx_lm is not None else None
    if model.load_notice:
        print(model.load_notice, file=sys.stderr)
    return model


def load(path: str | Path, dtype: mx.Dtype | None = None, *, mtp: bool = True,
         folder_format: FolderFormat | None = None, vision: bool = True) -> tuple[Model, Any]:
    """``(model, tokenizer)`` from a checkpoint folder with tokenizer files, ``"demo"`` or a Hub repo id.

    The tokenizer is mlx-lm's ``TokenizerWrapper`` (streaming detokenizer included),
    with every eos id from config.json.
    """
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from .hub import resolve_model

    path = resolve_model(path) if isinstance(path, str) else Path(path)
    model = load_model(path, dtype, mtp=mtp, folder_format=folder_format, vision=vision)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json / tokenizer.model)")
    tokenizer = load_tokenizer(path, eos_token_ids=model.config.eos_token_id or None)
    check_tokenizer(tokenizer, model.config.vocab_size)
    return model, tokenizer


def check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """``CheckpointError`` when the tokenizer can produce ids the model has no embedding for, or when
    the chat template does not render (a syntax error would otherwise surface at the first message)."""
    ids = tokenizer.get_vocab().values()
    largest = max(ids, default=-1)
    if largest >= vocab_size:
        raise CheckpointError(
            f"the tokenizer has token id {largest} but the model's vocab_size is {vocab_size}; "
            "the tokenizer files belong to another model"
        )
    if getattr(tokenizer, "chat_template", None):
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja2 raises its own error types
            where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise CheckpointError(f"the chat template cannot be used{where}: {e}") from None
