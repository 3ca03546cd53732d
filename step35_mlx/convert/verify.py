"""``step35-mlx verify DIR``: check a converted folder without loading its weights.

Checks, in order:

1. ``config.json`` parses as a Step 3.5 / 3.7 config;
2. every shard's header parses and the file is exactly as long as the header's data
   offsets say (truncated or padded shards are reported), and the index (when present)
   matches the shards tensor for tensor;
3. every tensor the model expects exists with the right shape and dtype: the model is
   built lazily from the config and quantized per the config's ``quantization`` block
   exactly as ``load_model`` would (explicit per-module entries, else ``P.scales`` in the
   files), and its parameter list is compared with the files' headers (packed weights
   ``uint32``; scales/biases and unquantized tensors floating point; ``router_bias``
   float32); nothing unexpected is present;
4. leftovers of an unfinished conversion (``*.tmp``, ``convert-progress.json``).

These read only headers. ``deep=True`` also reads every shard's data and compares its
sha256 with the one the converter recorded in the index (``metadata.step35_mlx_sha256``),
naming each shard whose bytes changed; a folder without recorded checksums gets a
warning saying its data could not be checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..loader import INDEX_FILE, _quantization_predicate, hf_to_internal
from ..safetensors_io import SafetensorsError, SafetensorsFile
from .integrity import CHECKSUM_KEY, file_sha256, recorded_checksums
from .progress import byte_progress

PROGRESS_FILE = "convert-progress.json"
_FLOAT = ("F32", "F16", "BF16")


@dataclass
class VerifyReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fatal: str | None = None  # set when the folder cannot be checked at all (missing, invalid config.json)
    num_tensors: int = 0
    num_shards: int = 0
    data_bytes: int = 0
    quantized_modules: int = 0
    recipe: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (
            f"{self.path}: {self.num_tensors} tensors in {self.num_shards} shard(s), "
            f"{self.data_bytes / 1e9:.2f} GB, {self.quantized_modules} quantized modules"
            + (f", recipe {self.recipe}" if self.recipe else "")
        )
        lines = [head]
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += self.notes
        lines.append("OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))")
        return "\n".join(lines)


def _limit(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def verify(path: str | Path, *, deep: bool = False, progress: bool = False) -> VerifyReport:
    """Check ``path`` (see module docstring); never raises for a damaged folder, reports instead.

    ``deep`` also hashes every shard against its recorded sha256 (``progress``: a Rich bar on stderr).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from ..config import ModelConfig
    from ..model import Model

    path = Path(path)
    rep = VerifyReport(path)
    if not path.is_dir():
        rep.fatal = f"folder not found: {path}"
        rep.problems.append(rep.fatal)
        return rep
    try:
        config = ModelConfig.from_file(path)
    except (OSError, ValueError) as e:
        rep.fatal = f"config.json: {e}"
        rep.problems.append(rep.fatal)
        return rep
    meta = config.raw.get("step35_mlx")
    if not isinstance(meta, dict):
        rep.warnings.append("config.json has no 'step35_mlx' block: not written by step35-mlx convert "
                            "(norm weight convention unknown)")
    else:
        rep.recipe = meta.get("recipe")
        if meta.get("norm_weights") != "zero_centered":
            rep.problems.append(f"config.json step35_mlx.norm_weights is {meta.get('norm_weights')!r}; "
                                "the model expects 'zero_centered'")

    leftovers = sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp") or p.name == PROGRESS_FILE)
    if leftovers:
        rep.problems.append(f"unfinished conversion ({_limit(leftovers)}); rerun the same convert command to resume")

    # -- shards
    index_path = path / INDEX_FILE
    weight_map: dict | None = None
    index: dict = {}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            rep.problems.append(f"{INDEX_FILE} is not a valid index ({e})")
            return rep
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
        if not names:
            rep.problems.append("no *.safetensors files")
            return rep
    files: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for n in names:
        f = path / n
        if not f.exists():
            rep.problems.append(f"shard {n} named in {INDEX_FILE} is missing")
            continue
        try:
            st = SafetensorsFile(f)
        except SafetensorsError as e:
            rep.problems.append(str(e))
            continue
        if st.size != st.header_bytes + st.data_size:
            rep.problems.append(f"shard {n} has {st.size - st.header_bytes - st.data_size} trailing bytes "
                                "beyond its header's data (corrupt)")
        files[n] = {k: (t.dtype, t.shape) for k, t in st.tensors.items()}
        rep.data_bytes += st.data_size
    rep.num_shards = len(files)
    if deep:
        _check_data(rep, path, [n for n in names if n in files], recorded_checksums(index), progress)
    else:
        rep.notes.append("data: not read (headers only); `step35-mlx verify --deep` hashes every shard "
                         "against its recorded sha256")
    located: dict[str, tuple[str, tuple[int, ...]]] = {}
    where: dict[str, str] = {}
    for n, tensors in files.items():
        for k, v in tensors.items():
            if k in located:
                rep.problems.append(f"tensor {k} is in both {where[k]} and {n}")
            located[k] = v
            where[k] = n
    if weight_map is not None:
        bad = [k for k, n in weight_map.items() if n in files and where.get(k) != n]
        if bad:
            rep.problems.append(f"{INDEX_FILE} names tensors not in the shards it names: {_limit(bad)}")
        unlisted = [k for k in located if k not in weight_map]
        if unlisted:
            rep.problems.append(f"tensors not listed in {INDEX_FILE}: {_limit(unlisted)}")
        total = (index.get("metadata") or {}).get("total_size")
        if total is not None and len(files) == len(names) and total != rep.data_bytes:
            rep.warnings.append(f"{INDEX_FILE} metadata.total_size {total} != {rep.data_bytes} bytes of tensor data")

    # -- expected tensors
    weights = {}
    for k, v in located.items():
        name = hf_to_internal(k, config.num_hidden_layers)
        if name is not None:
            weights[name] = v
    rep.num_tensors = len(weights)
    model = Model(config)
    quant = config.raw.get("quantization")
    if quant:
        try:
            nn.quantize(model, group_size=quant.get("group_size", 64), bits=quant.get("bits", 4),
                        mode=quant.get("mode", "affine"),
                        class_predicate=_quantization_predicate(quant, weights))
        except (ValueError, TypeError) as e:
            rep.problems.append(f"the quantization block cannot be applied to the model: {e}")
            return rep
    expected = dict(tree_flatten(model.parameters()))
    rep.quantized_modules = sum(1 for k, v in expected.items() if k.endswith(".weight") and v.dtype == mx.uint32)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        rep.problems.append(f"{len(missing)} missing tensor(s): {_limit(missing)}")
    if unexpected:
        rep.problems.append(f"{len(unexpected)} unexpected tensor(s): {_limit(unexpected)}")
    wrong_shape, wrong_dtype = [], []
    for k in sorted(set(expected) & set(weights)):
        dtype, shape = weights[k]
        want = expected[k]
        if tuple(shape) != tuple(want.shape):
            wrong_shape.append(f"{k} {list(shape)} (expected {list(want.shape)})")
            continue
        if want.dtype == mx.uint32:
            ok = dtype == "U32"
        elif k.endswith(".router_bias"):
            ok = dtype == "F32"
        else:
            ok = dtype in _FLOAT
        if ok and k.endswith(".biases"):
            ok = weights.get(k[: -len(".biases")] + ".scales", (dtype,))[0] == dtype
        if not ok:
            wrong_dtype.append(f"{k} {dtype}")
    if wrong_shape:
        rep.problems.append(f"{len(wrong_shape)} wrongly shaped tensor(s): {_limit(wrong_shape, 4)}")
    if wrong_dtype:
        rep.problems.append(f"{len(wrong_dtype)} tensor(s) with the wrong dtype: {_limit(wrong_dtype, 4)}")

    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        rep.warnings.append("no tokenizer files (tokenizer.json / tokenizer.model); `load` will need them")
    return rep


def _check_data(rep: VerifyReport, path: Path, names: list[str], sums: dict[str, str] | None,
                progress: bool) -> None:
    """Hash every shard and compare with the recorded sha256 (``verify --deep``)."""
    if sums is None:
        rep.warnings.append(f"no checksums recorded ({INDEX_FILE} has no metadata.{CHECKSUM_KEY}: not written by "
                            "this version of step35-mlx convert); --deep could not check the data")
        return
    unrecorded = [n for n in names if n not in sums]
    if unrecorded:
        rep.problems.append(f"no recorded sha256 for shard(s) {_limit(unrecorded)} in {INDEX_FILE}")
    checked = [n for n in names if n in sums]
    bar = byte_progress(progress, stderr=True)
    bad = 0
    with bar:
        task = bar.add_task("hashing shards", total=sum((path / n).stat().st_size for n in checked))
        for n in checked:
            bar.update(task, description=f"hashing {n}")
            digest = file_sha256(path / n, lambda k: bar.advance(task, k))
            if digest != sums[n]:
                bad += 1
                rep.problems.append(f"shard {n}: data does not match its recorded sha256 (recorded {sums[n][:12]}..., "
                                    f"file {digest[:12]}...): its bytes changed after conversion; re-convert the model")
    if checked:
        rep.notes.append(f"data: {len(checked) - bad} of {len(checked)} shard(s) match their recorded sha256")
