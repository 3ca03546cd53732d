"""Read mlx-lm / mlx-community conversions of Step 3.5 Flash as they are, without rewriting them.

What ``mlx_lm.convert`` changes (mlx-lm 0.32 ``models/step3p5.py`` ``sanitize``):

* names: ``.moe.{gate,up,down}_proj.`` -> ``.mlp.switch_mlp.*``, ``.moe.gate.`` ->
  ``.mlp.gate.gate.``, ``.moe.router_bias`` -> ``.mlp.gate.router_bias``,
  ``.share_expert.`` -> ``.mlp.share_expert.`` (expert tensors keep ``[E, out, in]``);
* every ``*norm*.weight`` is stored as ``1 + w``, rounded in the weight dtype (bf16);
* the MTP layers are dropped while ``num_nextn_predict_layers`` stays in config.json;
* ``quantization`` gets per-module entries under those names (the routers at 8 bits by
  default; a mixed recipe gives every module an entry, ``group_size`` possibly null).

:func:`read_folder` recognises such a folder from its tensor names, returns the config
corrected (real MTP count, quantization block under our names) and an :class:`MlxLmFolder`
whose :meth:`~MlxLmFolder.to_checkpoint` maps loaded tensors back to the original names
and convention. Norms become ``w = s - 1`` computed in float32 from the stored bf16 ``s``;
that subtraction is exact, and so is the model's ``1 + w``, so the runtime multiplies by
exactly the stored value. MTP tensors added by ``step35-mlx graft-mtp`` live under
``model.mtp.J.*`` (zero-centred norms) and are recorded in config.json under
:data:`GRAFT_KEY`; mlx-lm itself drops ``.mtp`` keys, so a grafted folder still loads there.
``graft-mtp --restore`` adds ``step35-restore/model.safetensors`` (float routers, exact norms),
which replaces the quantized routers and rounded norms here and which mlx-lm never reads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .config import ModelConfig, text_config
from .safetensors_io import SafetensorsError, SafetensorsFile
from .errors import CheckpointError

GRAFT_KEY = "step35_mlx_graft"
_INDEX = "model.safetensors.index.json"
# (mlx-lm name part, original name part); the first match wins.
RENAMES = (
    (".mlp.switch_mlp.gate_proj.", ".moe.gate_proj."),
    (".mlp.switch_mlp.up_proj.", ".moe.up_proj."),
    (".mlp.switch_mlp.down_proj.", ".moe.down_proj."),
    (".mlp.gate.gate.", ".moe.gate."),
    (".mlp.gate.router_bias", ".moe.router_bias"),
    (".mlp.share_expert.", ".share_expert."),
)
_MLX_LM_MARKERS = tuple(new for new, _ in RENAMES)
_ORIGINAL_MARKERS = (".moe.", ".share_expert.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Share of tokens whose top-8 expert set changes per layer with a quantized router, measured
# with the real router shape (benchmarks/router_precision.py; see quant/recipes.py).
ROUTER_TOP8_CHANGE = {8: "~8 %", 6: "~22 %", 4: "~61 %"}


def original_name(key: str) -> str:
    """An mlx-lm tensor name under the original checkpoint's name (other names unchanged)."""
    for new, old in RENAMES:
        if new in key:
            return key.replace(new, old, 1)
    return key


def mlx_lm_name(key: str) -> str:
    """The inverse of :func:`original_name`: a tensor name as ``mlx_lm.convert`` writes it."""
    for new, old in RENAMES:
        if old in key:
            return key.replace(old, new, 1)
    return key


def is_mlx_lm(names: list[str]) -> bool:
    """True when tensor (or module) names carry mlx-lm's MoE naming (``.mlp.switch_mlp.``, ``.mlp.gate.gate`` ...)."""
    return any(m in k + "." for k in names for m in _MLX_LM_MARKERS)


def _module_original(path: str) -> str:
    return original_name(path + ".")[:-1]


def is_norm(name: str) -> bool:
    """A norm weight (``*norm*.weight``), the tensors mlx-lm stores as ``1 + w``."""
    leaf = name.rsplit(".", 2)
    return len(leaf) == 3 and leaf[2] == "weight" and "norm" in leaf[1]


def tensor_names(path: Path) -> list[str]:
    """Tensor names of a folder from its index, else from its shard headers (nothing is loaded)."""
    index = path / _INDEX
    if index.exists():
        try:
            return list(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
    names: list[str] = []
    for f in sorted(path.glob("*.safetensors")):
        try:
            names += list(SafetensorsFile(f).tensors)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
    return names


@dataclass(frozen=True)
class MlxLmFolder:
    """An mlx-lm conversion: what it holds and how to read it."""

    path: Path
    num_hidden_layers: int
    stale_mtp: int  # num_nextn_predict_layers as config.json states it
    graft: dict | None  # the graft-mtp record, when MTP heads were added
    weight_bits: tuple[int, ...]  # distinct bits of the quantized modules other than the routers
    router_bits: int | None  # bits of the quantized routers (None: float)

    @property
    def mtp_layers(self) -> int:
        return int(self.graft["mtp_layers"]) if self.graft else 0

    @property
    def restore_file(self) -> Path | None:
        """The float routers and zero-centred norms fetched by ``graft-mtp --restore``, if any."""
        rec = (self.graft or {}).get("restore")
        return self.path / rec["file"] if rec else None

    def notice(self) -> str:
        """The one line said when such a folder loads: what it is and what it lacks."""
        bits = "/".join(str(b) for b in self.weight_bits)
        kind = "unquantized" if not bits else f"{bits}-bit" + (" mixed" if len(self.weight_bits) > 1 else "")
        parts = [f"{self.path.name} is an mlx-lm conversion ({kind})"]
        if self.graft:
            parts.append(f"MTP heads grafted from {self.graft['repo']}@{str(self.graft['revision'])[:12]}")
        else:
            parts.append(f"without its {self.stale_mtp} MTP heads (no speculative decoding; "
                         f"`step35-mlx graft-mtp {self.path}` adds them)")
        if self.restore_file:
            parts.append("float routers and exact norms restored from the original")
        elif self.router_bits in ROUTER_TOP8_CHANGE:
            parts.append(f"its {self.router_bits}-bit router changes the top-8 experts for "
                         f"{ROUTER_TOP8_CHANGE[self.router_bits]} of tokens per layer vs the float one")
        elif self.router_bits:
            parts.append(f"its {self.router_bits}-bit router changes the top-8 experts more often than an "
                         f"8-bit one ({ROUTER_TOP8_CHANGE[8]} of tokens per layer)")
        return "; ".join(parts)

    def to_checkpoint(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Tensors under the original names with zero-centred norms (``s - 1`` in float32).

        Grafted MTP tensors (``model.mtp.*``) are already zero-centred and pass unchanged. With a
        restore file, its float routers and exact norms replace the quantized and rounded ones.
        """
        out = {}
        for k, v in weights.items():
            name = original_name(k)
            if is_norm(name) and not name.startswith("model.mtp."):
                v = v.astype(mx.float32) - 1.0
            out[name] = v
        if self.restore_file:
            try:
                restored = mx.load(str(self.restore_file))
            except Exception as e:  # MLX raises RuntimeError/ValueError variants for damaged files
                raise CheckpointError(f"{self.restore_file} cannot be read ({e}); rerun graft-mtp --restore") from e
            for name, v in restored.items():
                if name.endswith(".moe.gate.weight"):
                    base = name[: -len(".weight")]
                    out.pop(base + ".scales", None)
                    out.pop(base + ".biases", None)
                out[name] = v
        return out


@dataclass(frozen=True)
class FolderFormat:
    """A checkpoint folder's config as it really is, and its mlx-lm reading when it is one."""

    config: ModelConfig
    mlx_lm: MlxLmFolder | None = None


def _check_names(path: Path, names: list[str], n_layers: int, graft: dict | None) -> None:
    def trunk(k: str) -> bool:
        m = _LAYER.match(k)
        return not k.startswith("model.mtp.") and not (m and int(m.group(1)) >= n_layers)

    new = [k for k in names if trunk(k) and any(m in k for m in _MLX_LM_MARKERS)]
    old = [k for k in names if trunk(k) and original_name(k) == k and any(m in k for m in _ORIGINAL_MARKERS)]
    if new and old:
        raise CheckpointError(
            f"{path} is half-converted: {len(new)} tensors use mlx-lm names (e.g. {new[0]}) and {len(old)} the "
            f"original names (e.g. {old[0]}); convert it again with mlx_lm.convert or re-download it"
        )
    extra = [k for k in names if not trunk(k)]
    if graft and not extra:
        raise CheckpointError(
            f"graft-mtp did not finish in {path}: config.json records MTP heads but the index lists none; "
            f"rerun `step35-mlx graft-mtp {path}`"
        )
    if extra and not graft:
        raise CheckpointError(
            f"{path} is an mlx-lm conversion holding MTP tensors (e.g. {extra[0]}) that graft-mtp did not record "
            f"in config.json; rerun `step35-mlx graft-mtp {path}` to finish the graft"
        )


def _spec(entry, default_group: int):
    if isinstance(entry, dict):
        entry = dict(entry)
        if entry.get("group_size") is None:
            entry["group_size"] = default_group
        return entry
    return entry


def _quantization(block: dict) -> dict:
    """The quantization block under our module names, with null group sizes made explicit."""
    group = block.get("group_size") or 64
    out = {}
    for k, v in block.items():
        if isinstance(v, (dict, bool)):
            out[_module_original(k)] = _spec(v, group)
        else:
            out[k] = v
    out["group_size"] = group
    return out


def _bits(names: list[str], block: dict | None) -> tuple[tuple[int, ...], int | None]:
    """(distinct bits of the quantized non-router modules, bits of the routers or None)."""
    if not block:
        return (), None
    default = int(block.get("bits", 4))
    weights, routers = set(), set()
    for k in names:
        if k.endswith(".scales"):
            entry = block.get(k[: -len(".scales")])
            bits = int(entry.get("bits") or default) if isinstance(entry, dict) else default
            (routers if k.endswith(".mlp.gate.gate.scales") else weights).add(bits)
    return tuple(sorted(weights)), (min(routers) if routers else None)


def read_folder(path: str | Path) -> FolderFormat:
    """The config of a checkpoint folder, corrected when it is an mlx-lm conversion.

    For an mlx-lm folder the MTP count becomes what the folder holds (0, or the grafted
    layers), ``quantization`` is keyed by our module names and ``quantization_config`` is
    dropped. Raises ``CheckpointError`` for a folder that mixes the two naming schemes.
    """
    path = Path(path)
    config = ModelConfig.from_file(path)
    if not path.is_dir() or config.raw.get("step35_mlx"):
        return FolderFormat(config)
    names = tensor_names(path)
    if not is_mlx_lm(names):
        return FolderFormat(config)
    raw = copy.deepcopy(config.raw)
    graft = raw.get(GRAFT_KEY)
    _check_names(path, names, config.num_hidden_layers, graft)
    block = raw.get("quantization")
    folder = MlxLmFolder(path, config.num_hidden_layers, config.num_nextn_predict_layers, graft,
                         *_bits(names, block))
    raw = _corrected(raw, folder.mtp_layers)
    if folder.restore_file:
        if not folder.restore_file.is_file():
            raise CheckpointError(f"config.json of {path} records restored routers and norms in "
                                  f"{folder.restore_file}, which is missing; rerun `step35-mlx graft-mtp --restore`")
        folder = dataclasses.replace(folder, router_bits=None)
        if raw.get("quantization"):  # the float routers replace the quantized ones
            raw["quantization"].update({f"model.layers.{i}.moe.gate": False for i in config.moe_layers})
    return FolderFormat(ModelConfig.from_dict(raw), folder)


def _corrected(raw: dict, mtp_layers: int) -> dict:
    text_config(raw)["num_nextn_predict_layers"] = mtp_layers
    raw.pop("quantization_config", None)
    if raw.get("quantization"):
        raw["quantization"] = _quantization(raw["quantization"])
    return raw


def remote_config(raw: dict) -> dict:
    """A config.json read without its folder (``plan --model REPO``): corrected when its quantization
    block names mlx-lm modules, which only an mlx-lm conversion (no MTP heads) has."""
    block = raw.get("quantization")
    if not isinstance(block, dict) or not is_mlx_lm(list(block)) or raw.get(GRAFT_KEY):
        return raw
    return _corrected(copy.deepcopy(raw), 0)
