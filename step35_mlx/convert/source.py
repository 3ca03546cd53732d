"""A Hugging Face source checkpoint, opened for streaming conversion.

Opening validates everything that can be checked without reading tensor data, before
anything is written: ``config.json`` parses, every shard's header parses and the file
is as long as its header says, the index names only tensors that are in the shards it
names (and vice versa), every tensor the model needs is present with the right shape,
and the source's own quantization (if any) is one we can undo.

Supported source formats
------------------------
* ``BF16`` / ``F16`` / ``F32`` tensors (the bf16 release, or synthetic float32 checkpoints).
* Block-wise FP8 (``stepfun-ai/Step-3.5-Flash-FP8``): ``quantization_config.quant_method
  == "fp8"``; an ``F8_E4M3`` tensor ``X.weight`` comes with ``X.weight_scale_inv``
  (float32, one factor per ``weight_block_size`` block, default ``[128, 128]``, over the
  last two axes; 3-D fused experts ``[E, out, in]`` carry 3-D scales
  ``[E, ceil(out/128), ceil(in/128)]``) and is dequantized on the fly as
  ``w = fp8 * scale_inv`` (DeepSeek-V3 convention). Per-tensor / per-channel FP8
  (``X.weight_scale`` without ``weight_block_size``) is read the same way with a
  broadcast scale. ``input_scale`` / activation scales are ignored (weights only).
  Facts checked against public sources and what is unverified: see ``FP8_NOTES``.
* Anything else (GPTQ, AWQ, compressed-tensors, NVFP4, MXFP4, bitsandbytes, an MLX
  conversion, ...) is refused with an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig, text_config
from ..loader import INDEX_FILE, hf_to_internal
from ..safetensors_io import FLOAT_DTYPES, SafetensorsError, SafetensorsFile, TensorInfo

FP8_NOTES = """\
FP8 source format (stepfun-ai/Step-3.5-Flash-FP8):
- Confirmed from public code/discussion: vLLM's step3p5 loader maps the fused 3-D expert
  tensors' scales as `moe.{gate,up,down}_proj.weight_scale*` (its block-FP8 MoE parameter is
  `w13_weight_scale_inv`), i.e. one scale tensor per fused [E, out, in] expert tensor;
  TensorRT-LLM PR #14759 (Step-3.7-Flash-FP8, same text backbone) states that only the routed
  experts are FP8 (F8_E4M3, block [128, 128], `moe.{gate,up,down}_proj.weight_scale_inv`)
  while router, shared expert, attention and dense layers stay bf16; a public ATOM/AITER
  debugging report names `moe.gate_proj.weight_scale_inv` and 1280/128 = 10 scale blocks
  along the expert intermediate dim; a user-reported size of ~195 GiB / 44 shards matches
  "experts FP8 + rest bf16" arithmetic.
- Unverified (no network here): the exact `quantization_config` dict of the 3.5 FP8 repo
  (assumed {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
  "activation_scheme": "dynamic"}), the scale dtype (float32 assumed; any float accepted),
  and whether the MTP layers' tensors are FP8 (handled either way).
"""

SUPPORTED_SOURCE_QUANT = ("fp8",)
_COMPANION = re.compile(r"\.(weight_scale_inv|weight_scale|input_scale|activation_scale)$")


class ConvertError(ValueError):
    """A problem with the user's input (source, output folder, options); printed as one line."""


# e4m3fn decoding table: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7F/0xFF are NaN; no inf.
def _e4m3_table() -> np.ndarray:
    t = np.zeros(256, dtype=np.float32)
    for b in range(256):
        s = -1.0 if b & 0x80 else 1.0
        e = (b >> 3) & 0xF
        m = b & 0x7
        if e == 0xF and m == 0x7:
            t[b] = np.nan
        elif e == 0:
            t[b] = s * (m / 8.0) * 2.0 ** -6
        else:
            t[b] = s * (1 + m / 8.0) * 2.0 ** (e - 7)
    return t


E4M3_TABLE = _e4m3_table()


@dataclass
class SourceTensor:
    key: str  # name in the source shard
    name: str  # internal name (``loader.hf_to_internal``)
    file: SafetensorsFile
    info: TensorInfo
    scale_file: SafetensorsFile | None = None
    scale: TensorInfo | None = None  # fp8 companion (weight_scale_inv or weight_scale)
    block: tuple[int, int] | None = None  # fp8 block size over the last two axes; None = broadcast scale

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def is_fp8(self) -> bool:
        return self.info.dtype == "F8_E4M3"

    def row_align(self) -> int:
        """Axis-0 chunks must start at multiples of this (fp8 block rows of a 2-D tensor)."""
        if self.is_fp8 and self.block is not None and len(self.shape) == 2:
            return self.block[0]
        return 1

    def read(self, r0: int, r1: int):
        """Rows ``[r0, r1)`` of axis 0 as an MLX float array (fp8 dequantized to bfloat16)."""
        import mlx.core as mx

        raw = self.file.read_rows(self.info, r0, r1)
        if self.info.dtype == "BF16":
            return mx.array(raw).view(mx.bfloat16)
        if self.info.dtype in ("F32", "F16"):
            return mx.array(raw)
        if self.is_fp8:
            return self._dequant_fp8(raw, r0, r1)
        raise ConvertError(f"tensor {self.key} has dtype {self.info.dtype}, which cannot be converted")

    def _dequant_fp8(self, raw: np.ndarray, r0: int, r1: int):
        import mlx.core as mx

        w = mx.array(E4M3_TABLE[raw])
        s = _to_float(self.scale_file.read_rows(self.scale, 0, self.scale.shape[0] if self.scale.shape else 0),
                      self.scale.dtype)
        shape = self.shape
        if self.block is None:  # per-tensor / per-channel / per-expert scale, broadcast
            if s.size == 1:
                s = s.reshape(())
            elif len(shape) == 2 and s.size == shape[0]:
                s = s.reshape(shape[0], 1)[r0:r1]
            elif len(shape) == 3 and s.size == shape[0]:
                s = s.reshape(shape[0], 1, 1)[r0:r1]
            elif len(shape) == 3 and s.size == shape[0] * shape[1]:
                s = s.reshape(shape[0], shape[1], 1)[r0:r1]
            else:
                raise ConvertError(f"fp8 scale of {self.key} has shape {list(self.scale.shape)}, "
                                   f"which does not broadcast to {list(shape)}")
            return (w * mx.array(s)).astype(mx.bfloat16)
        bn, bk = self.block
        if len(shape) == 2:
            s = s[r0 // bn: -(-r1 // bn)]
        elif len(shape) == 3:
            s = s[r0:r1]
        else:
            raise ConvertError(f"fp8 tensor {self.key} has {len(shape)} dims; only 2-D and 3-D are supported")
        rows, cols = w.shape[-2], w.shape[-1]
        s = mx.repeat(mx.repeat(mx.array(s), bn, axis=-2), bk, axis=-1)[..., :rows, :cols]
        return (w * s).astype(mx.bfloat16)


def _to_float(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F32", "F16", "F64"):
        return a.astype(np.float32)
    raise ConvertError(f"fp8 scale tensor has unsupported dtype {dtype}")


def _describe_quant(qc: dict) -> str:
    method = qc.get("quant_method") or qc.get("quant_type") or "unknown"
    fmt = qc.get("format") or qc.get("fmt")
    return f"{method}" + (f" ({fmt})" if fmt and fmt != method else "")


class SourceCheckpoint:
    """A validated Hugging Face checkpoint folder; ``tensors`` are in file order, then offset order."""

    def __init__(self, path: str | Path, keep_mtp: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConvertError(f"folder not found: {self.path}")
        cfg_path = self.path / "config.json"
        if not cfg_path.exists():
            raise ConvertError(f"{self.path} has no config.json; is it a Hugging Face checkpoint folder?")
        self.config_bytes = cfg_path.read_bytes()
        try:
            self.raw_config = json.loads(self.config_bytes)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{cfg_path} is not valid JSON ({e})") from None
        try:
            self.model_config = ModelConfig.from_dict(self.raw_config)
        except ValueError as e:
            raise ConvertError(f"{cfg_path}: {e}") from None
        self.text_config = text_config(self.raw_config)
        if "quantization" in self.raw_config:
            raise ConvertError(
                f"{self.path} is already an MLX-quantized checkpoint (config.json has a 'quantization' block); "
                "convert from the original Hugging Face release instead"
            )
        qc = self.raw_config.get("quantization_config") or self.text_config.get("quantization_config")
        self.quantization_config = qc
        self.fp8_block: tuple[int, int] | None = None
        if qc:
            method = str(qc.get("quant_method", "")).lower()
            if method not in SUPPORTED_SOURCE_QUANT:
                raise ConvertError(
                    f"source checkpoint is quantized with '{_describe_quant(qc)}' (config.json quantization_config), "
                    "which step35-mlx convert cannot read; use the bf16 release stepfun-ai/Step-3.5-Flash "
                    "or the FP8 release stepfun-ai/Step-3.5-Flash-FP8"
                )
            fmt = str(qc.get("fmt", "e4m3")).lower()
            if fmt not in ("e4m3", "float8_e4m3fn", "e4m3fn"):
                raise ConvertError(f"source FP8 format '{fmt}' is not supported (only e4m3)")
            block = qc.get("weight_block_size")
            if block is not None:
                if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                    raise ConvertError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
                self.fp8_block = (block[0], block[1])
        self.keep_mtp = keep_mtp
        self.files = self._open_shards()
        self.tensors = self._collect()

    # -- shards and index

    def _open_shards(self) -> list[SafetensorsFile]:
        index_path = self.path / INDEX_FILE
        weight_map = None
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{index_path} is not a valid safetensors index ({e})") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).exists()]
            if missing:
                raise ConvertError(
                    f"{self.path} is missing shard(s) {', '.join(missing[:4])} named in {INDEX_FILE}; "
                    "re-download the checkpoint"
                )
        else:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not names:
                raise ConvertError(f"no *.safetensors files in {self.path}")
        files = []
        for n in names:
            try:
                files.append(SafetensorsFile(self.path / n))
            except SafetensorsError as e:
                raise ConvertError(f"{e} (in {self.path})") from None
        if weight_map is not None:
            by_name = {f.path.name: f for f in files}
            for key, fname in weight_map.items():
                if key not in by_name[fname]:
                    raise ConvertError(
                        f"{INDEX_FILE} says tensor {key} is in {fname}, but that shard does not contain it; "
                        "the index does not match the shards (incomplete download?)"
                    )
            for f in files:
                extra = [k for k in f.tensors if weight_map.get(k) != f.path.name]
                if extra:
                    raise ConvertError(
                        f"shard {f.path.name} holds tensor {extra[0]} that {INDEX_FILE} does not list there "
                        f"({len(extra)} such tensors); the index does not match the shards"
                    )
        self.index_present = weight_map is not None
        return files

    # -- tensors

    def _collect(self) -> list[SourceTensor]:
        from ..quant.recipes import expected_tensors

        n_trunk = self.model_config.num_hidden_layers
        located: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
        for f in self.files:
            for key, info in f.tensors.items():
                if key in located:
                    raise ConvertError(f"tensor {key} appears in both {located[key][0].path.name} and {f.path.name}")
                located[key] = (f, info)
        if any(k.endswith(".scales") or ".switch_mlp." in k for k in located):
            raise ConvertError(
                f"{self.path} looks like an MLX conversion (it has '.scales' / 'switch_mlp' tensors); "
                "convert from the original Hugging Face release instead"
            )

        expected = dict(expected_tensors(self.model_config, mtp=self.keep_mtp))
        out: list[SourceTensor] = []
        seen: dict[str, str] = {}
        unexpected = []
        for f in self.files:
            for key, info in sorted(f.tensors.items(), key=lambda kv: kv[1].begin):
                if _COMPANION.search(key):
                    continue
                name = hf_to_internal(key, n_trunk)
                if name is None:
                    continue  # vision tower of a Step 3.7 checkpoint
                if name.startswith("model.mtp.") and not self.keep_mtp:
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                if name in seen:
                    raise ConvertError(f"tensors {seen[name]} and {key} both map to {name}")
                seen[name] = key
                if tuple(info.shape) != tuple(expected[name]):
                    raise ConvertError(
                        f"tensor {key} has shape {list(info.shape)}, but config.json implies {list(expected[name])}"
                    )
                t = SourceTensor(key, name, f, info)
                self._attach_scale(t, located)
                out.append(t)
        if unexpected:
            raise ConvertError(
                f"{len(unexpected)} source tensor(s) do not belong to the model described by config.json: "
                + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
            )
        missing = [n for n in expected if n not in seen]
        if missing:
            mtp_missing = all(n.startswith("model.mtp.") for n in missing)
            hint = (
                "; the source has no MTP layers — pass --drop-mtp to convert without them"
                if mtp_missing else "; the download is incomplete or the config does not match the weights"
            )
            raise ConvertError(
                f"{len(missing)} tensor(s) missing from the source: " + ", ".join(missing[:5])
                + (" ..." if len(missing) > 5 else "") + hint
            )
        return out

    def _attach_scale(self, t: SourceTensor, located: dict) -> None:
        dtype = t.info.dtype
        if dtype in FLOAT_DTYPES:
            return
        if dtype != "F8_E4M3":
            raise ConvertError(
                f"tensor {t.key} has dtype {dtype}: this source quantization is not supported "
                "(supported: bf16 / f16 / f32, and block-wise FP8 e4m3 with weight_scale_inv)"
            )
        base = t.key[: -len(".weight")] if t.key.endswith(".weight") else t.key
        for suffix, blockwise in ((".weight_scale_inv", True), (".weight_scale", False)):
            if base + suffix in located:
                t.scale_file, t.scale = located[base + suffix]
                if blockwise or self.fp8_block is not None:
                    t.block = self.fp8_block or (128, 128)
                    bn, bk = t.block
                    want = t.shape[:-2] + (-(-t.shape[-2] // bn), -(-t.shape[-1] // bk))
                    if tuple(t.scale.shape) != want:
                        raise ConvertError(
                            f"fp8 scale {base + suffix} has shape {list(t.scale.shape)}; with block {[bn, bk]} "
                            f"tensor {t.key} {list(t.shape)} needs {list(want)}"
                        )
                return
        raise ConvertError(f"fp8 tensor {t.key} has no {base}.weight_scale_inv / .weight_scale companion")

    # -- identity

    def fingerprint(self) -> dict:
        """Names, sizes and header hashes of the shards plus the config hash (no data is read)."""
        files = []
        for f in self.files:
            with open(f.path, "rb") as fh:
                head = fh.read(f.header_bytes)
            files.append([f.path.name, f.size, hashlib.sha256(head).hexdigest()])
        return {"config": hashlib.sha256(self.config_bytes).hexdigest(), "files": files}

    @property
    def total_bytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors)
