"""Load only what a rank holds: build the split model's shapes, then read just those tensor slices.

The model is built lazily (no weight is materialised), quantized per ``config.json``,
split for the mode; every parameter it then has is read from the safetensors files
as the matching slice of the checkpoint tensor (a row range, or a column range via a
memory map), so a rank's memory holds its share and not the whole model.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..config import ModelConfig
from ..safetensors_io import DTYPES, FLOAT_DTYPES, SafetensorsFile, TensorInfo
from ..loader import CheckpointError, _cast, _quantization_predicate, hf_to_internal, shard_files
from ..model import Model
from .expert import expert_range, shard_experts
from .pipeline import shard_pipeline, split_layers
from .share import MODES, Layout, check_subset
from .tensor import shard_tensor

_LOCAL_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorRef:
    file: SafetensorsFile
    info: TensorInfo


def tensor_index(path: Path, config: ModelConfig, mtp: bool = True) -> dict[str, TensorRef]:
    """Internal parameter name -> where its tensor lies (headers only; nothing is read)."""
    index: dict[str, TensorRef] = {}
    for f in shard_files(path):
        st = SafetensorsFile(f)
        for key, info in st.tensors.items():
            if ".switch_mlp." in key:
                raise CheckpointError(f"{path} is an mlx-lm conversion, which loads in one process only; "
                                      "for --parallel convert the original checkpoint with `step35-mlx convert`")
            name = hf_to_internal(key, config.num_hidden_layers)
            if name is not None and (mtp or not name.startswith("model.mtp.")):
                index[name] = TensorRef(st, info)
    return index


def tensor_sizes(index: dict[str, TensorRef]) -> dict[str, tuple[tuple[int, ...], int, bool]]:
    """``share.rank_bytes`` input: name -> (shape, stored itemsize, floating)."""
    return {k: (r.info.shape, DTYPES[r.info.dtype][0], r.info.dtype in FLOAT_DTYPES) for k, r in index.items()}


def read_slice(ref: TensorRef, axis: int | None = None, start: int = 0, length: int = 0) -> mx.array:
    """The tensor, or ``length`` entries from ``start`` along ``axis``, read through a memory map."""
    info = ref.info
    if info.dtype not in DTYPES or info.dtype.startswith("F8"):
        raise CheckpointError(f"{info.name}: dtype {info.dtype} is not supported here; convert the checkpoint first")
    raw = np.memmap(ref.file.path, dtype=DTYPES[info.dtype][1], mode="r", offset=info.begin, shape=info.shape)
    if axis is not None:
        sl = [slice(None)] * raw.ndim
        sl[axis] = slice(start, start + length)
        raw = raw[tuple(sl)]
    out = mx.array(np.ascontiguousarray(raw))
    del raw
    return out.view(mx.bfloat16) if info.dtype == "BF16" else out


def _global_name(name: str, first_layer: int) -> str:
    m = _LOCAL_LAYER.match(name)
    if not m or not first_layer:
        return name
    return f"model.layers.{int(m.group(1)) + first_layer}.{name[m.end():]}"


def shard_model(model: Model, group: mx.distributed.Group, mode: str, split: list[int] | None = None) -> Model:
    """Split ``model`` (in memory, lazy or loaded) for this rank; tensor/expert in place, pipeline a new stage model."""
    n = group.size()
    counts = tuple(split or split_layers(model.config.num_hidden_layers, [1.0] * n)) if mode == "pipeline" else ()
    if mode == "tensor":
        shard_tensor(model, group)
    elif mode == "expert":
        shard_experts(model, group)
    elif mode == "pipeline":
        model = shard_pipeline(model, group, list(counts))
    else:
        raise ValueError(f"unknown parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    model.token_group = group
    model.layout = Layout(mode, n, model.config.moe_num_experts, counts)
    return model


def build_model(config: ModelConfig, index: dict[str, TensorRef], layout: Layout, group) -> tuple[Model, int]:
    """The lazy (unloaded) model of one rank, quantized like the checkpoint, and its first trunk layer."""
    model = Model(config)
    quant = config.raw.get("quantization")
    if quant:
        nn.quantize(model, group_size=quant.get("group_size", 64), bits=quant.get("bits", 4),
                    mode=quant.get("mode", "affine"), class_predicate=_quantization_predicate(quant, index))
    model = shard_model(model, group, layout.mode, list(layout.counts) or None)
    return model, (model.stage.first if layout.mode == "pipeline" else 0)


def slice_for(name: str, param: mx.array, first: int, index: dict[str, TensorRef], layout: Layout,
              rank: int) -> tuple[str, TensorRef, tuple[int, int, int] | None]:
    """(checkpoint name, where it lies, ``(axis, start, length)`` or ``None`` for all of it) of one parameter."""
    g = _global_name(name, first)
    if g not in index:
        raise CheckpointError(f"checkpoint does not match config.json: missing tensor {g}")
    ref = index[g]
    want = ref.info.shape
    diff = [a for a in range(len(want)) if want[a] != param.shape[a]] if len(want) == param.ndim else [-1]
    if len(diff) > 1 or (diff and want[diff[0]] < param.shape[diff[0]]):
        raise CheckpointError(f"checkpoint does not match config.json: {g} is {list(want)}, "
                              f"this rank expects a slice of shape {list(param.shape)}")
    if not diff:
        return g, ref, None
    a = diff[0]
    return g, ref, (a, _slice_start(layout, rank, param.shape[a]), param.shape[a])


def _slice_start(layout: Layout, rank: int, axis_len: int) -> int:
    if layout.mode == "expert":
        return expert_range(layout.num_experts, layout.ranks, rank).start
    return rank * axis_len


def load_distributed(path: str | Path, mode: str, group: mx.distributed.Group, *, split: list[int] | None = None,
                     dtype: mx.Dtype | None = None, mtp: bool = True) -> Model:
    """This rank's part of the checkpoint at ``path`` for ``mode`` (tensor, expert or pipeline).

    ``split``: trunk layers per pipeline stage (default: even). ``dtype`` as in ``loader.load_model``.
    The returned model's generated tokens are taken from rank 0 (``model.token_group``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if dtype is None and mx.default_device() == mx.cpu:
        dtype = mx.float32
    config = ModelConfig.from_file(path)
    if not mtp and config.num_nextn_predict_layers:
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
    index = tensor_index(path, config, mtp)
    n = group.size()
    counts = tuple(split or split_layers(config.num_hidden_layers, [1.0] * n)) if mode == "pipeline" else ()
    layout = Layout(mode, n, config.moe_num_experts, counts)
    check_subset(config, layout, group.rank())
    model, first = build_model(config, index, layout, group)
    weights = {}
    for name, param in tree_flatten(model.parameters()):
        _, ref, sl = slice_for(name, param, first, index, layout, group.rank())
        weights[name] = read_slice(ref, *sl) if sl else read_slice(ref)
    model.load_weights(list(_cast(weights, dtype).items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    model.source_path = path
    return model


def param_bytes(model: nn.Module) -> int:
    """Bytes of every parameter the model holds."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
