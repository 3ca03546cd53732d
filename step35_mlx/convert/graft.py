"""Graft the MTP heads of the original checkpoint onto an mlx-lm conversion, fetching only them.

``mlx_lm.convert`` drops the MTP layers (``model.layers.45``-``47``, 51 tensors, ~4.9 GB
in bf16). This module reads the original repo's index and the safetensors header of each
shard that holds them (HTTP range requests), range-reads just those tensors into a staging
folder inside the target (resumable, per byte), quantizes them with our recipe code, and
writes one extra shard plus the index and config entries. Commit order: shard, then
config.json (with the :data:`~step35_mlx.mlx_lm_format.GRAFT_KEY` record), then the index;
until the index lists the new tensors the loader says the graft is unfinished.

``restore=True`` also fetches the trunk's float routers and zero-centred norms (~100 MB for
the release) into ``step35-restore/model.safetensors``, kept float; only step35-mlx reads it
(``mlx_lm_format``), so config.json's router entries and mlx-lm's view of the folder stay as they were.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..config import ModelConfig, text_config
from ..loader import INDEX_FILE, hf_to_internal
from ..mlx_lm_format import GRAFT_KEY, is_mlx_lm, is_norm, mlx_lm_name, tensor_names
from ..quant.recipes import (
    QuantSpec, Recipe, effective_spec, expected_tensors, output_tensors, source_dtype_for, tensor_bytes, uniform,
)
from .remote import RemoteError, RepoFiles
from ..safetensors_io import (
    DTYPES, FLOAT_DTYPES, ShardWriter, TensorInfo, atomic_write_json, encode_header, nbytes,
)
from .source import ConvertError

DEFAULT_REPO = "stepfun-ai/Step-3.5-Flash"
GRAFT_SHARD = "model-mtp.safetensors"
RESTORE_DIR = "step35-restore"  # outside mlx-lm's glob of the folder's *.safetensors
RESTORE_FILE = "model.safetensors"
STAGING = ".graft-mtp"
CHUNK_ELEMS = 8 * 2**20


@dataclass(frozen=True)
class RemoteTensor:
    """A tensor of the source repo that a graft fetches."""

    key: str  # name in the source repo
    name: str  # our internal name (model.mtp.J.*, or a trunk router / norm for --restore)
    info: TensorInfo  # dtype, shape and absolute byte range in ``shard``
    shard: str
    spec: QuantSpec | None
    outputs: list  # [(name, dtype, shape)] written for it


@dataclass
class OutputFile:
    """One file a graft writes: its tensors in order, planned header and offsets."""

    path: Path
    tensors: list[RemoteTensor]
    header: bytes = b""
    offsets: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.header, self.offsets = encode_header([o for t in self.tensors for o in t.outputs], {"format": "mlx"})

    @property
    def data_bytes(self) -> int:
        return sum(tensor_bytes(t.outputs) for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes

    def complete(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                return self.path.stat().st_size == self.size and f.read(len(self.header)) == self.header
        except OSError:
            return False


@dataclass
class GraftPlan:
    """Everything a graft reads and writes, decided from the remote headers alone.

    ``shard``: the MTP heads (empty when the folder has them already); ``restore``: the float
    routers and zero-centred norms of the trunk, when asked for (``None`` otherwise).
    """

    folder: Path
    repo: str
    revision: str  # the commit
    mtp_layers: int
    shard: OutputFile
    restore: OutputFile | None
    shards_read: list[str]
    shards_total: int
    metadata_bytes: int  # index + safetensors headers read
    recipe: Recipe | None

    @property
    def tensors(self) -> list[RemoteTensor]:
        return self.shard.tensors

    @property
    def outputs(self) -> list[OutputFile]:
        return [f for f in (self.shard, self.restore) if f is not None and f.tensors]

    @property
    def download_bytes(self) -> int:
        return sum(t.info.nbytes for f in self.outputs for t in f.tensors)

    @property
    def data_bytes(self) -> int:
        return self.shard.data_bytes

    @property
    def shard_bytes(self) -> int:
        return sum(f.size for f in self.outputs)

    @property
    def staging(self) -> Path:
        return self.folder / STAGING / self.revision


@dataclass(frozen=True)
class GraftResult:
    """What a graft did: its plan (``None`` when the folder was grafted already) and the record in config.json."""

    record: dict
    plan: GraftPlan | None = None
    received: int = 0  # bytes fetched in this run (index and headers included)


def _natural(key: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def _target(folder: Path) -> tuple[dict, ModelConfig, list[str]]:
    """(config.json, its stale parsed config, tensor names); refuses folders that are not mlx-lm conversions."""
    if not (folder / "config.json").is_file():
        raise ConvertError(f"{folder} is not a model folder (no config.json)")
    config = ModelConfig.from_file(folder)
    names = tensor_names(folder)
    if config.raw.get("step35_mlx") or not is_mlx_lm(names):
        raise ConvertError(f"{folder} is not an mlx-lm conversion; graft-mtp adds MTP heads to folders made by "
                           "mlx_lm.convert (mlx-community); `step35-mlx convert` keeps them already")
    if not config.num_nextn_predict_layers:
        raise ConvertError(f"config.json of {folder} says the model has no MTP layers (num_nextn_predict_layers 0)")
    return json.loads((folder / "config.json").read_text()), config, names


def is_grafted(folder: Path) -> bool:
    """True when the folder's config records a graft and its index lists the grafted tensors."""
    raw = json.loads((folder / "config.json").read_text())
    return bool(raw.get(GRAFT_KEY)) and any(k.startswith("model.mtp.") for k in tensor_names(folder))


def is_restored(folder: Path) -> bool:
    rec = json.loads((folder / "config.json").read_text()).get(GRAFT_KEY) or {}
    return bool(rec.get("restore")) and (folder / RESTORE_DIR / RESTORE_FILE).is_file()


def _restorable(name: str) -> bool:
    """Trunk tensors mlx-lm degrades: the routers (quantized) and the norms (``1 + w`` rounded)."""
    return not name.startswith("model.mtp.") and (name.endswith(".moe.gate.weight") or is_norm(name))


def _recipe(raw: dict, bits: int | None) -> Recipe | None:
    """``--bits`` as a uniform recipe; by default the folder's own global bits and group size (float if it has none)."""
    block = raw.get("quantization")
    if bits is not None:
        return uniform(bits, int((block or {}).get("group_size") or 64))
    if not block:
        return None
    return uniform(int(block.get("bits", 4)), int(block.get("group_size") or 64))


def plan_graft(folder: str | Path, repo: str = DEFAULT_REPO, revision: str | None = None, *, bits: int | None = None,
               endpoint: str | None = None, remote: RepoFiles | None = None, mtp: bool = True,
               restore: bool = False) -> GraftPlan:
    """Read the original's index and the headers of the shards holding the wanted tensors; plan the output files.

    ``mtp``: the MTP heads (quantized like the folder); ``restore``: also the trunk's float routers
    and zero-centred norms (kept as they are, in ``step35-restore/``).
    """
    folder = Path(folder)
    raw, config, _ = _target(folder)
    recipe = _recipe(raw, bits)
    remote = remote or RepoFiles(repo, revision, endpoint=endpoint)
    index_bytes = remote.pin(INDEX_FILE)
    try:
        weight_map = json.loads(index_bytes)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RemoteError(f"{INDEX_FILE} of {repo}@{remote.revision} is not a safetensors index ({e})") from None
    n = config.num_hidden_layers

    def wanted_name(name: str) -> bool:
        return (mtp and name.startswith("model.mtp.")) or (restore and _restorable(name))

    expected = {name: shape for name, shape in expected_tensors(config) if wanted_name(name)}
    found = {hf_to_internal(k, n): k for k in weight_map}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ConvertError(f"{repo}@{remote.revision[:12]} lacks {len(missing)} tensor(s) the config needs "
                           f"(e.g. {missing[0]}); is it the original Step 3.5 Flash checkpoint?")
    shards = sorted({weight_map[found[name]] for name in expected})
    headers = {s: remote.header(s) for s in shards}
    heads, restored = [], []
    for name in sorted(expected, key=_natural):
        key = found[name]
        info = headers[weight_map[key]].tensors.get(key)
        if info is None:
            raise RemoteError(f"{INDEX_FILE} of {repo} puts {key} in {weight_map[key]}, whose header lacks it")
        if info.shape != tuple(expected[name]):
            raise ConvertError(f"{repo}: {key} has shape {list(info.shape)}; the config of {folder} needs "
                               f"{list(expected[name])} (a different model?)")
        if info.dtype not in FLOAT_DTYPES:
            raise ConvertError(f"{repo}: {key} is {info.dtype}; graft-mtp reads the bf16 original only")
        if name.startswith("model.mtp."):
            spec = effective_spec(recipe.spec_for(name), info.shape) if recipe else None
            heads.append(RemoteTensor(key, name, info, weight_map[key], spec,
                                   output_tensors(mlx_lm_name(name), info.shape, info.dtype, spec)))
        else:
            restored.append(RemoteTensor(key, name, info, weight_map[key], None,
                                      output_tensors(name, info.shape, info.dtype, None)))
    return GraftPlan(folder, repo, remote.revision, config.num_nextn_predict_layers,
                     OutputFile(folder / GRAFT_SHARD, heads),
                     OutputFile(folder / RESTORE_DIR / RESTORE_FILE, restored) if restore else None,
                     shards, len(set(weight_map.values())), remote.received, recipe)


@dataclass(frozen=True)
class GraftEstimate:
    tensors: int
    download_bytes: int  # the MTP tensors in the bf16 release
    output_bytes: int  # after quantization with the recipe
    restore_tensors: int  # the trunk's routers and norms (--restore)
    restore_bytes: int  # downloaded and written as they are


def config_estimate(config: ModelConfig | dict, recipe: Recipe | None) -> GraftEstimate:
    """Graft sizes from the config's shapes alone (no index at hand), assuming the bf16 release."""
    every = expected_tensors(config)
    tensors = [(n, s) for n, s in every if n.startswith("model.mtp.")]
    out = 0
    for n, s in tensors:
        spec = effective_spec(recipe.spec_for(n), s) if recipe else None
        out += tensor_bytes(output_tensors(n, s, source_dtype_for(n), spec))
    restore = [(n, s) for n, s in every if _restorable(n)]
    return GraftEstimate(len(tensors), sum(nbytes(source_dtype_for(n), s) for n, s in tensors), out,
                         len(restore), sum(nbytes(source_dtype_for(n), s) for n, s in restore))


def target_config(folder: str | Path, bits: int | None = None) -> tuple[ModelConfig, Recipe | None]:
    """The mlx-lm folder's config (MTP count as config.json states it) and the recipe a graft would use."""
    raw, config, _ = _target(Path(folder))
    return config, _recipe(raw, bits)


# ----------------------------------------------------------------------------- fetch, quantize, write


def _staged(plan: GraftPlan, t: RemoteTensor) -> Path:
    return plan.staging / f"{t.key}.bin"


def staged_bytes(plan: GraftPlan) -> int:
    """Bytes of the plan's tensors already on disk from an earlier, interrupted run."""
    total = 0
    for f in plan.outputs:
        for t in f.tensors:
            done = _staged(plan, t)
            part = done.with_suffix(".part")
            total += done.stat().st_size if done.exists() else (part.stat().st_size if part.exists() else 0)
    return total


def _fetch(plan: GraftPlan, out: OutputFile, remote: RepoFiles, advance: Callable[[int], None]) -> None:
    plan.staging.mkdir(parents=True, exist_ok=True)
    for t in out.tensors:
        done = _staged(plan, t)
        if done.exists() and done.stat().st_size == t.info.nbytes:
            continue
        part = done.with_suffix(".part")
        have = part.stat().st_size if part.exists() else 0
        if have > t.info.nbytes:
            part.unlink()
            have = 0
        if have < t.info.nbytes:
            with open(part, "ab") as f:
                def write(chunk: bytes) -> None:
                    f.write(chunk)
                    advance(len(chunk))

                remote.stream_range(t.shard, t.info.begin + have, t.info.end, write)
        part.replace(done)


def _rows(info: TensorInfo) -> int:
    """Rows of axis 0 per slice, about ``CHUNK_ELEMS`` elements."""
    per_row = 1
    for d in info.shape[1:]:
        per_row *= d
    return max(1, CHUNK_ELEMS // per_row)


def _write(plan: GraftPlan, out: OutputFile) -> None:
    """Write ``out`` from the staged source bytes: quantized slice by slice, or the float bits as they are."""
    import mlx.core as mx
    import numpy as np

    out.path.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out.path, out.header, out.data_bytes)
    try:
        pos = 0
        for t in out.tensors:
            offs = out.offsets[pos: pos + len(t.outputs)]
            pos += len(t.outputs)
            raw = np.memmap(_staged(plan, t), dtype=DTYPES[t.info.dtype][1], mode="r", shape=t.info.shape)
            step = _rows(t.info)
            row_bytes = [nbytes(dt, shape[1:]) for _, dt, shape in t.outputs]
            for r0 in range(0, t.info.shape[0] if t.info.shape else 1, step):
                if t.spec is None:  # kept float: the source bits as they are
                    writer.write_at(offs[0] + r0 * row_bytes[0], np.ascontiguousarray(raw[r0: r0 + step]))
                    continue
                x = mx.array(np.ascontiguousarray(raw[r0: r0 + step]))
                if t.info.dtype == "BF16":
                    x = x.view(mx.bfloat16)
                parts = list(mx.quantize(x, t.spec.group_size, t.spec.bits, mode="affine"))
                mx.eval(parts)
                for part, off, rb in zip(parts, offs, row_bytes):
                    arr = np.asarray(part.view(mx.uint16) if part.dtype == mx.bfloat16 else part)
                    writer.write_at(off + r0 * rb, arr)
            del raw
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def graft_config(raw: dict, plan: GraftPlan) -> dict:
    """config.json with quantization entries for the grafted modules and the graft record."""
    cfg = copy.deepcopy(raw)
    if plan.tensors:
        entries = {}
        for t in plan.tensors:
            if t.name.endswith(".weight") and len(t.info.shape) >= 2:
                entries[mlx_lm_name(t.name)[: -len(".weight")]] = t.spec.as_config() if t.spec else False
        for block in ("quantization", "quantization_config"):
            if isinstance(cfg.get(block), dict):
                cfg[block].update(entries)
        text_config(cfg)["num_nextn_predict_layers"] = plan.mtp_layers
        cfg[GRAFT_KEY] = {
            "repo": plan.repo,
            "revision": plan.revision,
            "shard": GRAFT_SHARD,
            "mtp_layers": plan.mtp_layers,
            "tensors": len(plan.tensors),
            "quantization": plan.recipe.default.as_config() if plan.recipe else None,
            "norm_weights": "zero_centered",
            "tool": f"step35-mlx {__version__}",
        }
    if plan.restore is not None:
        # read by step35-mlx only: config.json's router entries stay as mlx-lm wrote them
        cfg[GRAFT_KEY]["restore"] = {"file": f"{RESTORE_DIR}/{RESTORE_FILE}", "tensors": len(plan.restore.tensors),
                                     "revision": plan.revision}
    return cfg


def _write_index(plan: GraftPlan) -> None:
    path = plan.folder / INDEX_FILE
    if path.exists():
        index = json.loads(path.read_text())
    else:  # a single-shard folder without an index: index what is there
        from ..safetensors_io import SafetensorsFile

        index = {"metadata": {}, "weight_map": {}}
        for f in sorted(plan.folder.glob("*.safetensors")):
            if f.name != GRAFT_SHARD:
                index["weight_map"].update({k: f.name for k in SafetensorsFile(f).tensors})
    wm = {k: v for k, v in index["weight_map"].items() if v != GRAFT_SHARD}
    wm.update({o[0]: GRAFT_SHARD for t in plan.tensors for o in t.outputs})
    index["weight_map"] = dict(sorted(wm.items()))
    meta = index.setdefault("metadata", {})
    if "total_size" in meta:
        meta["total_size"] = int(meta["total_size"]) + plan.data_bytes
    atomic_write_json(path, index)


def graft_mtp(folder: str | Path, repo: str = DEFAULT_REPO, revision: str | None = None, *, bits: int | None = None,
              endpoint: str | None = None, restore: bool = False,
              progress: Callable[[int, int], None] | None = None) -> GraftResult:
    """Fetch, quantize and add the MTP heads of ``repo`` to the mlx-lm folder ``folder``.

    ``restore`` also fetches the trunk's float routers and zero-centred norms (into
    ``step35-restore/``, which mlx-lm never reads). ``progress(done, total)`` is called as tensor
    bytes arrive. A rerun after an interruption downloads only the bytes not yet on disk (same
    commit). Raises ``ConvertError`` (and its ``RemoteError``) with a message for the user.
    """
    folder = Path(folder)
    remote = RepoFiles(repo, revision, endpoint=endpoint)
    grafted = (folder / "config.json").is_file() and is_grafted(folder)
    if grafted and (not restore or is_restored(folder)):
        return GraftResult(json.loads((folder / "config.json").read_text())[GRAFT_KEY])
    plan = plan_graft(folder, repo, revision, bits=bits, remote=remote, mtp=not grafted, restore=restore)
    raw = json.loads((folder / "config.json").read_text())
    done = staged_bytes(plan)
    total = plan.download_bytes
    free = shutil.disk_usage(folder).free
    need = (total - done) + plan.shard_bytes
    if need > free:
        raise ConvertError(f"the graft needs {need / 1e9:.2f} GB in {folder} but {free / 1e9:.2f} GB are free")

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    if progress:
        progress(done, total)
    for out in plan.outputs:
        if not out.complete():
            _fetch(plan, out, remote, advance)
            _write(plan, out)
    cfg = graft_config(raw, plan)
    atomic_write_json(folder / "config.json", cfg)
    if plan.tensors:
        _write_index(plan)
    shutil.rmtree(folder / STAGING, ignore_errors=True)
    return GraftResult(cfg[GRAFT_KEY], plan, remote.received)
