"""The saved-session file: one safetensors file, written atomically, read back only after every field checks out.

A session file is user input (it can be damaged, truncated or crafted), so :func:`read_session_file`
validates the metadata and every array's shape and dtype against the loaded model before the
session changes anything; problems are a ``ValueError`` that says what is wrong.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

SESSION_FORMAT = "step35-mlx-session"
SESSION_VERSION = 1
SESSION_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class SessionFile:
    """What a valid session file holds: its metadata (checked), its arrays by name, and an empty cache
    of its KV format (``cache_format``: the ``make_cache`` arguments) to load them into."""

    meta: dict
    arrays: dict[str, mx.array]
    cache: list
    cache_format: dict


def write_session_file(path: Path, arrays: dict[str, mx.array], meta: dict,
                       meta_key: str = "step35_mlx_session") -> Path:
    """Write atomically: a temporary file in the same folder, renamed over ``path`` only when complete.

    ``meta`` is stored as JSON under the safetensors metadata key ``meta_key``.

    File-system failures (read-only, full, missing permission) raise ``OSError`` subclasses and leave
    neither a partial ``path`` nor the temporary file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # mx.save_safetensors appends ".safetensors" to other names: write a temp file, then rename.
    fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        try:
            mx.save_safetensors(tmp, arrays, metadata={meta_key: json.dumps(meta)})
        except RuntimeError as e:  # MLX reports a failed write (e.g. a full disk) as RuntimeError
            raise OSError(errno.EIO, f"cannot write {path}: {e}") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_session_file(path: Path, *, fingerprint: str, make_cache: Callable[..., list], layer_specs: list,
                      vocab_size: int, setting_names: tuple[str, ...]) -> SessionFile:
    """Read and check a session file against the model (``fingerprint``, ``make_cache`` and the per-layer
    ``layer_specs`` describe it); ``ValueError`` says what is wrong, ``FileNotFoundError`` if there is no file."""
    if not path.is_file():
        raise FileNotFoundError(f"no session file at {path}")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
        meta = json.loads(metadata["step35_mlx_session"])
    except Exception as e:  # noqa: BLE001 - any failure to parse means "not a session file"
        raise ValueError(f"{path} is not a step35-mlx session file ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT or meta.get("version") != SESSION_VERSION:
        raise ValueError(f"{path} is not a step35-mlx session file (version {SESSION_VERSION})")
    if meta.get("model") != fingerprint:
        raise ValueError(f"{path} was saved with a different model (config.json differs); it cannot be loaded here")
    try:
        cache_format = _cache_format(meta)
        cache = make_cache(**cache_format)
        _check(meta, arrays, cache, layer_specs, vocab_size, setting_names)
    except ValueError as e:
        raise ValueError(f"{path} is damaged: {e}") from None
    try:
        mx.eval(list(arrays.values()))  # read the data now: a truncated file fails here, not mid-session
    except Exception as e:  # noqa: BLE001 - MLX reports short reads as RuntimeError/ValueError
        raise ValueError(f"{path} is damaged: its data cannot be read ({type(e).__name__})") from None
    return SessionFile(meta, arrays, cache, cache_format)


def _cache_format(meta: dict) -> dict:
    """``make_cache`` keyword arguments for the file's KV format, checked."""
    layers = meta.get("layers")
    if not isinstance(layers, list) or not all(isinstance(e, dict) for e in layers):
        raise ValueError("'layers' must be a list of objects")
    first = layers[0] if layers else {}
    bits, group = first.get("bits"), first.get("group_size", 64)
    if bits not in (None, 4, 8) or group not in (32, 64, 128):
        raise ValueError(f"KV format bits={bits!r} group_size={group!r} is not one this runtime writes")
    kw: dict[str, Any] = {} if bits is None else {"kv_bits": bits, "kv_group_size": group}
    slack = next((e.get("slack") for e in layers if e.get("kind") == "sliding"), None)
    if slack is not None:
        kw["slack"] = _int(slack, "sliding slack", 0, 4096)
    return kw


def _int(value: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{what} must be an integer {bound}, got {value!r}")
    return value


def _token_list(value: Any, what: str, vocab_size: int) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of token ids")
    for t in value:
        _int(t, f"{what} entries", 0, vocab_size - 1)
    return value


def _check_messages(messages: Any, tools: Any) -> None:
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in SESSION_ROLES:
            raise ValueError(f"message {i} must be an object whose role is one of {', '.join(SESSION_ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"message {i}: content must be text or a list of parts")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError("'tools' must be a list of tool definitions")


def _expected_shapes(spec: Any, length: int, bits: int | None, group: int) -> list[tuple[tuple[int, ...], str]]:
    lead = (1, spec.num_kv_heads, length)
    if bits is None:
        return [((*lead, spec.head_dim), "float")]
    return [((*lead, spec.head_dim * bits // 32), "uint32"), ((*lead, spec.head_dim // group), "float"),
            ((*lead, spec.head_dim // group), "float")]


def _check_arrays(arrays: dict, prefix: str, n_parts: Any, spec: Any, length: int, bits: int | None,
                  group: int) -> None:
    expected = _expected_shapes(spec, length, bits, group)
    if n_parts != len(expected):
        raise ValueError(f"{prefix} must have {len(expected)} part(s), the file says {n_parts!r}")
    for j, (shape, kind) in enumerate(expected):
        a = arrays.get(f"{prefix}.{j}")
        if a is None:
            raise ValueError(f"array {prefix}.{j} is missing")
        ok_dtype = a.dtype == mx.uint32 if kind == "uint32" else mx.issubdtype(a.dtype, mx.floating)
        if tuple(a.shape) != shape or not ok_dtype:
            raise ValueError(f"array {prefix}.{j} is {tuple(a.shape)} {a.dtype}; expected {shape} {kind}")


def _check(meta: dict, arrays: dict, cache: list, specs: list, vocab_size: int, setting_names: tuple) -> None:
    _check_messages(meta.get("messages"), meta.get("tools"))
    defaults = meta.get("defaults", {})
    if not isinstance(defaults, dict) or any(k not in setting_names for k in defaults):
        raise ValueError(f"'defaults' must be an object with keys among {', '.join(setting_names)}")
    _int(meta.get("prefilled_tokens", 0), "'prefilled_tokens'")
    tokens = _token_list(meta.get("cache_tokens"), "'cache_tokens'", vocab_size)
    layers = meta["layers"]
    if len(layers) != len(cache):
        raise ValueError(f"it must describe {len(cache)} cache layers (one per model layer)")
    first = layers[0] if layers else {}
    kv_format = (first.get("bits"), first.get("group_size", 64))
    bits, group = kv_format
    for i, (c, entry, spec) in enumerate(zip(cache, layers, specs)):
        where = f"cache layer {i}"
        if (entry.get("bits"), entry.get("group_size", 64)) != kv_format:
            raise ValueError(f"{where} has a different KV format than layer 0")
        sliding = hasattr(c, "capacity")
        if entry.get("kind") != ("sliding" if sliding else "full"):
            raise ValueError(f"{where} is not a {'sliding' if sliding else 'full'}-attention cache as in the model")
        offset = _int(entry.get("offset"), f"{where} offset")
        if offset != len(tokens):
            raise ValueError(f"{where} holds {offset} positions but 'cache_tokens' has {len(tokens)}")
        if sliding:
            if entry.get("window") != c.window or entry.get("capacity") != c.capacity:
                raise ValueError(f"{where} has window/capacity {entry.get('window')!r}/{entry.get('capacity')!r}; "
                                 f"the model's ring is {c.window}/{c.capacity}")
            low = _int(entry.get("low"), f"{where} low", 0, offset)
            if offset - low > c.capacity:
                raise ValueError(f"{where} low {low} is inconsistent with offset {offset}")
        if offset and "parts" not in entry:
            raise ValueError(f"{where} holds {offset} positions but no arrays")
        if "parts" in entry:
            length = c.capacity if sliding else offset
            for name in ("keys", "values"):
                _check_arrays(arrays, f"cache.{i}.{name}", entry["parts"], spec, length, bits, group)
    snap = meta.get("snapshot")
    if snap is None:
        return
    if not isinstance(snap, dict) or not isinstance(snap.get("rings"), dict):
        raise ValueError("'snapshot' must be an object with 'tokens' and 'rings'")
    snap_tokens = _token_list(snap.get("tokens"), "snapshot tokens", vocab_size)
    for key, ring in snap["rings"].items():
        i = int(key) if isinstance(key, str) and key.isdigit() else -1
        if not 0 <= i < len(cache) or not hasattr(cache[i], "capacity") or not isinstance(ring, dict):
            raise ValueError(f"snapshot ring {key!r} is not a sliding layer of the model")
        offset = _int(ring.get("offset"), f"snapshot ring {i} offset", 0, len(snap_tokens))
        _int(ring.get("low"), f"snapshot ring {i} low", 0, offset)
        for name in ("keys", "values"):
            _check_arrays(arrays, f"snapshot.{i}.{name}", ring.get("parts"), specs[i], cache[i].capacity, bits, group)
