"""Streaming, resumable conversion of a Hugging Face checkpoint into an MLX folder.

How it works
------------
1. **Open and validate the source** (``SourceCheckpoint``): headers, index, shapes,
   source quantization. Nothing is written if this fails.
2. **Plan the whole output up front** (``make_plan``): for each source tensor (in
   source-file order) the recipe decides float or ``(bits, group_size)``; the output
   tensors (``P.weight`` / ``P.scales`` / ``P.biases`` or the float tensor) and their
   exact byte sizes follow from the shapes alone. Tensors are packed greedily, in that
   order, into shards of at most ``shard_size`` bytes, and every shard's safetensors
   header is computed. The plan — and so the output — depends only on the source
   headers, the recipe and the options, never on timing; its hash (the *fingerprint*)
   identifies the conversion.
3. **Write shard by shard**: a shard is written to ``NAME.tmp`` (header first, then
   each tensor's bytes at its planned offset, produced a slice of rows / experts at a
   time so peak memory is a few times ``chunk_elems``), fsync'd and renamed to its final
   name; its sha256 is computed while it is written (``ShardWriter``).
   ``convert-progress.json`` (written atomically) records completed shards and their sha256.
4. **Finish**: ``model.safetensors.index.json`` (with every shard's sha256 under
   ``metadata.step35_mlx_sha256``), tokenizer files, chat template and generation config,
   and finally ``config.json`` (with the ``quantization`` block and a ``step35_mlx``
   block); then the progress file is removed.

A rerun with the same source and options keeps the shards already complete (planned size
and header, then their sha256 recomputed and compared with the recorded one; a shard
whose bytes changed is rewritten) and produces byte-identical files; a rerun with
different options into the same folder is refused. A failure of the file system (disk
full, read-only, no permission) raises ``ConvertError`` with one plain sentence; the
shard being written is removed and a rerun resumes.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..loader import INDEX_FILE
from ..quant.recipes import (
    DEFAULT_RECIPE, QuantSpec, Recipe, effective_spec, get_recipe, output_tensors, tensor_bytes,
)
from ..safetensors_io import (
    ShardWriter, SafetensorsError, SafetensorsFile, atomic_write_bytes, atomic_write_json, encode_header, nbytes,
)
from .integrity import CHECKSUM_KEY, file_sha256, write_failure
from .progress import byte_progress
from .source import ConvertError, SourceCheckpoint, SourceTensor

FORMAT_VERSION = 1
PROGRESS_FILE = "convert-progress.json"
DEFAULT_SHARD_SIZE = 5 * 10**9
DEFAULT_CHUNK_ELEMS = 8 * 2**20  # elements of one source slice (32 MB as float32)
EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json", "generation_config.json",
)
EXTRA_GLOBS = ("*.jinja", "tokenizer*")

Hook = Callable[..., None]


@dataclass
class PlanItem:
    src: SourceTensor
    spec: QuantSpec | None
    outputs: list[tuple[str, str, tuple[int, ...]]]
    nbytes: int
    offsets: list[int] = field(default_factory=list)


@dataclass
class ShardPlan:
    index: int
    name: str
    items: list[PlanItem]
    header: bytes
    data_size: int

    @property
    def size(self) -> int:
        return len(self.header) + self.data_size


@dataclass
class ConversionPlan:
    source: SourceCheckpoint
    recipe: Recipe
    keep_mtp: bool
    shard_size: int
    shards: list[ShardPlan]
    quantization: dict
    config: dict
    fingerprint: str

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def weight_map(self) -> dict[str, str]:
        return {o[0]: s.name for s in self.shards for it in s.items for o in it.outputs}


def _natural(key: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def _shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def quantization_block(items: list[PlanItem], recipe: Recipe) -> dict:
    """The config's ``quantization`` block: global spec, then an entry for each module that differs."""
    block: dict = {"group_size": recipe.default.group_size, "bits": recipe.default.bits, "mode": "affine"}
    for it in sorted(items, key=lambda it: _natural(it.src.name)):
        name, shape = it.src.name, it.src.shape
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        path = name[: -len(".weight")]
        if it.spec is None:
            block[path] = False
        elif it.spec != recipe.default:
            block[path] = it.spec.as_config()
    return block


def output_config(source: SourceCheckpoint, recipe: Recipe, keep_mtp: bool, quant: dict, label: str) -> dict:
    cfg = copy.deepcopy(source.raw_config)
    cfg.pop("quantization_config", None)
    text = cfg.get("text_config") if cfg.get("model_type") == "step3p7" else cfg
    text.pop("quantization_config", None)
    if not keep_mtp:
        text["num_nextn_predict_layers"] = 0
    cfg["quantization"] = quant
    cfg["step35_mlx"] = {
        "format": FORMAT_VERSION,
        "norm_weights": "zero_centered",
        "recipe": recipe.name,
        "source": label,
        "mtp_layers": source.model_config.num_nextn_predict_layers if keep_mtp else 0,
        "converter": f"step35-mlx {__version__}",
    }
    return cfg


def make_plan(source: SourceCheckpoint, recipe: Recipe | str = DEFAULT_RECIPE, *,
              shard_size: int = DEFAULT_SHARD_SIZE, label: str | None = None) -> ConversionPlan:
    """Decide every output tensor, its shard and its offset, from headers alone."""
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if shard_size <= 0:
        raise ConvertError("--shard-size must be positive")
    items = []
    for t in source.tensors:
        spec = effective_spec(recipe.spec_for(t.name), t.shape)
        outs = output_tensors(t.name, t.shape, t.dtype, spec)
        items.append(PlanItem(t, spec, outs, tensor_bytes(outs)))

    groups: list[list[PlanItem]] = []
    cur: list[PlanItem] = []
    cur_bytes = 0
    for it in items:
        if cur and cur_bytes + it.nbytes > shard_size:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += it.nbytes
    if cur:
        groups.append(cur)

    shards = []
    n = len(groups)
    for k, group in enumerate(groups, start=1):
        entries = [o for it in group for o in it.outputs]
        header, offsets = encode_header(entries, {"format": "mlx"})
        pos = 0
        for it in group:
            it.offsets = offsets[pos: pos + len(it.outputs)]
            pos += len(it.outputs)
        data = sum(it.nbytes for it in group)
        shards.append(ShardPlan(k, _shard_name(k, n), group, header, data))

    label = label or source.path.name
    quant = quantization_block(items, recipe)
    keep_mtp = source.keep_mtp
    cfg = output_config(source, recipe, keep_mtp, quant, label)
    fp = hashlib.sha256(json.dumps({
        "format": FORMAT_VERSION,
        "recipe": recipe.fingerprint(),
        "keep_mtp": keep_mtp,
        "shard_size": shard_size,
        "label": label,
        "source": source.fingerprint(),
        "shards": [hashlib.sha256(s.header).hexdigest() for s in shards],
    }, sort_keys=True).encode()).hexdigest()
    cfg["step35_mlx"]["fingerprint"] = fp
    return ConversionPlan(source, recipe, keep_mtp, shard_size, shards, quant, cfg, fp)


# ----------------------------------------------------------------------------- writing


def _np_bits(a):
    """An MLX array as a NumPy array of the same bits (bf16 viewed as uint16)."""
    import mlx.core as mx
    import numpy as np

    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


def _chunk_rows(t: SourceTensor, chunk_elems: int) -> int:
    if len(t.shape) <= 1:
        return max(1, t.shape[0] if t.shape else 1)
    per_row = 1
    for d in t.shape[1:]:
        per_row *= d
    rows = max(1, chunk_elems // per_row)
    align = t.row_align()
    if align > 1:
        rows = max(align, rows // align * align)
    return min(rows, t.shape[0])


def _row_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of one slice along axis 0."""
    return nbytes(dtype, shape[1:])


def _write_item(writer: ShardWriter, it: PlanItem, chunk_elems: int, on_bytes: Callable[[int], None]) -> None:
    import mlx.core as mx

    t = it.src
    if it.spec is None and not t.is_fp8:
        # Float tensor kept as is: copy its bytes verbatim, in bounded pieces.
        step = max(1, chunk_elems) * 4
        total = t.info.nbytes
        for start in range(0, total, step):
            data = t.file.read_bytes(t.info, start, min(step, total - start))
            writer.write_at(it.offsets[0] + start, data)
            on_bytes(len(data))
        return
    if len(t.shape) == 0:
        raise ConvertError(f"tensor {t.key} is a scalar fp8 tensor; not supported")
    n_rows = t.shape[0]
    step = _chunk_rows(t, chunk_elems)
    row_bytes = [_row_bytes(dt, shape) for _, dt, shape in it.outputs]
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        x = t.read(r0, r1)
        if it.spec is None:
            parts = [x]
        else:
            parts = list(mx.quantize(x, it.spec.group_size, it.spec.bits, mode="affine"))
        mx.eval(parts)
        for part, off, rb in zip(parts, it.offsets, row_bytes):
            arr = _np_bits(part)
            writer.write_at(off + r0 * rb, arr)
            on_bytes(arr.nbytes)
        del x, parts


def _shard_complete(path: Path, shard: ShardPlan) -> bool:
    try:
        if path.stat().st_size != shard.size:
            return False
        with open(path, "rb") as f:
            return f.read(len(shard.header)) == shard.header
    except OSError:
        return False


@dataclass
class ConvertResult:
    out: Path
    plan: ConversionPlan
    written_shards: int
    skipped_shards: int
    already_complete: bool = False


def _check_out_dir(out: Path, plan: ConversionPlan) -> tuple[dict | None, bool]:
    """``(progress, already_complete)``; raises ConvertError when ``out`` holds something else."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file, not a folder")
    if not out.exists():
        return None, False
    progress_path = out / PROGRESS_FILE
    cfg_path = out / "config.json"
    if progress_path.exists():
        try:
            progress = json.loads(progress_path.read_text())
        except (json.JSONDecodeError, OSError):
            progress = None
        if not progress or progress.get("fingerprint") != plan.fingerprint:
            raise ConvertError(
                f"{out} holds an unfinished conversion with different settings (source, recipe, --drop-mtp or "
                "--shard-size); rerun it with the same settings to resume, or choose another --out"
            )
        return progress, False
    if cfg_path.exists():
        try:
            fp = json.loads(cfg_path.read_text()).get("step35_mlx", {}).get("fingerprint")
        except (json.JSONDecodeError, OSError, AttributeError):
            fp = None
        if fp == plan.fingerprint and all(_shard_complete(out / s.name, s) for s in plan.shards):
            return None, True
        raise ConvertError(f"{out} already contains a converted model; choose another --out or delete it")
    leftovers = [p for p in out.iterdir() if not p.name.endswith(".tmp")]
    if leftovers:
        raise ConvertError(f"--out {out} is not empty (it has {leftovers[0].name}); choose an empty or new folder")
    return None, False


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _check_writable(out: Path) -> None:
    """Refuse up front when ``out`` cannot be written (read-only file system, no permission)."""
    probe = _existing(out)
    if not os.access(probe, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(probe).f_flag & os.ST_RDONLY else errno.EACCES
        raise ConvertError(write_failure(OSError(code, os.strerror(code), str(probe)), out))


def _check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(_existing(out)).free
    if needed > free:
        raise ConvertError(
            f"the conversion needs {needed / 1e9:.1f} GB more in {out}, but only {free / 1e9:.1f} GB are free; "
            "free some space or choose another --out"
        )


def _copy_extras(src: Path, out: Path) -> list[str]:
    names = {n for n in EXTRA_FILES if (src / n).is_file()}
    for pattern in EXTRA_GLOBS:
        names.update(p.name for p in src.glob(pattern) if p.is_file())
    names.discard("config.json")
    for n in sorted(names):
        atomic_write_bytes(out / n, (src / n).read_bytes())
    return sorted(names)


def convert_checkpoint(
    source: str | Path | SourceCheckpoint,
    out: str | Path,
    *,
    recipe: Recipe | str = DEFAULT_RECIPE,
    keep_mtp: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
    label: str | None = None,
    progress: bool = True,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    log: Callable[[str], None] | None = None,
    hook: Hook | None = None,
) -> ConvertResult:
    """Convert a local Hugging Face checkpoint folder into an MLX folder at ``out``.

    ``hook(event, **info)`` is called after every tensor written into a shard (``"chunk"``,
    with ``shard`` and ``tensor``) and after every committed shard (``"shard_done"``, with
    ``shard``, 1-based); tests use it to simulate a crash. Raises ``ConvertError`` for user-facing
    problems (bad source, non-empty or foreign output folder, not enough disk, a file-system
    failure while writing).
    """
    log = log or (lambda msg: None)
    src = source if isinstance(source, SourceCheckpoint) else SourceCheckpoint(Path(source), keep_mtp=keep_mtp)
    plan = make_plan(src, recipe, shard_size=shard_size, label=label)
    out = Path(out)
    prior, complete = _check_out_dir(out, plan)
    if complete:
        log(f"{out} already holds this conversion; nothing to do (`step35-mlx verify --deep {out}` checks its data)")
        return ConvertResult(out, plan, 0, len(plan.shards), already_complete=True)

    _check_writable(out)
    try:
        kept = _kept_shards(out, plan, prior, progress, log) if prior else {}
        _check_disk(out, sum(s.size for s in plan.shards if s.name not in kept) + 64 * 2**20)
        with byte_progress(progress) as bar:
            written = _write_shards(src, plan, out, kept, bar, chunk_elems, log, hook)
    except OSError as e:
        raise ConvertError(write_failure(e, out, Path(e.filename).name if e.filename else None)) from e
    log(f"wrote {len(plan.shards)} shard(s), {plan.total_bytes / 1e9:.2f} GB, to {out}")
    return ConvertResult(out, plan, written, len(plan.shards) - written)


def _kept_shards(out: Path, plan: ConversionPlan, prior: dict, progress: bool,
                 log: Callable[[str], None]) -> dict[str, str]:
    """``{name: sha256}`` of the shards a previous run finished whose bytes still match their checksum.

    A finished shard without a recorded checksum (a progress file of an older version) is rewritten.
    """
    done = set(prior.get("completed", []))
    sums = prior.get("sha256") if isinstance(prior.get("sha256"), dict) else {}
    candidates = [s for s in plan.shards if s.name in done and sums.get(s.name) and _shard_complete(out / s.name, s)]
    kept: dict[str, str] = {}
    if not candidates:
        return kept
    with byte_progress(progress) as bar:
        task = bar.add_task("checking finished shards", total=sum(s.size for s in candidates))
        for s in candidates:
            if file_sha256(out / s.name, lambda n: bar.advance(task, n)) == sums[s.name]:
                kept[s.name] = sums[s.name]
            else:
                log(f"{s.name} changed since it was written (sha256 mismatch); rewriting it")
    return kept


def _write_shards(src: SourceCheckpoint, plan: ConversionPlan, out: Path, kept: dict[str, str], bar,
                  chunk_elems: int, log: Callable[[str], None], hook: Hook | None) -> int:
    """Write every shard not in ``kept``, then the index, extras and config; returns shards written."""
    todo = [s for s in plan.shards if s.name not in kept]
    out.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": plan.fingerprint, "shards": [s.name for s in plan.shards],
             "completed": [s.name for s in plan.shards if s.name in kept], "sha256": dict(kept)}
    atomic_write_json(out / PROGRESS_FILE, state)
    if kept:
        log(f"resuming: {len(kept)} of {len(plan.shards)} shards already complete (checksums re-checked)")
    task = bar.add_task("converting", total=plan.total_bytes, completed=sum(s.size for s in plan.shards if s.name in kept))
    for shard in todo:
        bar.update(task, description=f"shard {shard.index}/{len(plan.shards)}")
        writer = ShardWriter(out / shard.name, shard.header, shard.data_size)
        try:
            bar.advance(task, len(shard.header))
            for it in shard.items:
                _write_item(writer, it, chunk_elems, lambda n: bar.advance(task, n))
                if hook:
                    hook("chunk", shard=shard.index, tensor=it.src.name)
            digest = writer.commit()
        except BaseException as e:
            writer.abort()
            if isinstance(e, OSError):
                done = f"{shard.name} ({len(state['completed'])} of {len(plan.shards)} shards complete)"
                raise ConvertError(write_failure(e, out, done)) from e
            raise
        state["completed"].append(shard.name)
        state["sha256"][shard.name] = digest
        atomic_write_json(out / PROGRESS_FILE, state)
        if hook:
            hook("shard_done", shard=shard.index)

    metadata = {"total_size": sum(s.data_size for s in plan.shards),
                CHECKSUM_KEY: {s.name: state["sha256"][s.name] for s in plan.shards}}
    atomic_write_json(out / INDEX_FILE, {"metadata": metadata, "weight_map": dict(sorted(plan.weight_map.items()))})
    _copy_extras(src.path, out)
    atomic_write_json(out / "config.json", plan.config)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    for p in out.glob("*.tmp"):
        p.unlink(missing_ok=True)
    return len(todo)


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9, ``"5GiB"`` -> 5 * 2**30, ``"500MB"``, or plain bytes."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10,
             "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise ConvertError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise ConvertError(f"size {text!r} must be positive")
    return int(value * mult)


__all__ = [
    "ConvertError", "ConvertResult", "ConversionPlan", "convert_checkpoint", "make_plan", "parse_size",
    "SafetensorsError", "SafetensorsFile", "PROGRESS_FILE",
]
