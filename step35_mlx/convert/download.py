"""Resolve a conversion SOURCE: a local checkpoint folder, or a Hugging Face Hub repo to download.

Rules, in order:

1. SOURCE names an existing folder -> use it (it must contain ``config.json``).
2. SOURCE looks like a path (starts with ``/ ./ ../ ~``, contains a backslash, has
   more than one ``/``, or ends with ``/``) -> "folder not found", never a repo-id error.
3. Otherwise SOURCE must be a valid repo id (``owner/name``). We ask the Hub for the
   file list with sizes, keep only what conversion needs (``ALLOW_PATTERNS``), compare
   the bytes still to download with the free disk space, and download with
   ``snapshot_download`` (resumable: an interrupted download continues where it stopped).
   An unreachable Hub gives a message that suggests passing a local folder.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .source import ConvertError

DEFAULT_REPO = "stepfun-ai/Step-3.5-Flash"
ALLOW_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "tokenizer*",
    "*.jinja",
    "generation_config.json",
    "special_tokens_map.json",
]
_NET_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "aiohttp", "socket", "ssl")


@dataclass
class ResolvedSource:
    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        return self.repo_id or self.path.name


def looks_like_path(source: str) -> bool:
    s = str(source)
    return (
        s.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or s in (".", "..")
        or "\\" in s
        or s.count("/") > 1
        or s.endswith("/")
        or (len(s) > 1 and s[1] == ":")  # C:\...
    )


def _is_network_error(e: BaseException) -> bool:
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return True
    except ImportError:  # pragma: no cover - old huggingface_hub
        pass
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    root = type(e).__module__.split(".")[0]
    name = type(e).__name__
    return root in _NET_MODULES or any(w in name for w in ("Connect", "Timeout", "Network", "Offline"))


def _offline_message(repo_id: str, e: BaseException) -> str:
    return (
        f"cannot reach the Hugging Face Hub to fetch {repo_id} ({type(e).__name__}: {str(e)[:120]}); "
        f"download the checkpoint where you have a connection and pass its folder instead, e.g. "
        f"`step35-mlx convert /path/to/Step-3.5-Flash --out DIR`"
    )


def _hub_error(repo_id: str, e: BaseException) -> ConvertError:
    from huggingface_hub import errors as hfe

    if isinstance(e, hfe.GatedRepoError):
        return ConvertError(f"{repo_id} is gated: accept its license on huggingface.co and log in (`hf auth login`)")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return ConvertError(f"repo {repo_id} not found on the Hugging Face Hub (or it is private: log in with "
                            "`hf auth login`); for a local checkpoint pass an existing folder")
    if isinstance(e, hfe.RevisionNotFoundError):
        return ConvertError(f"revision not found in {repo_id}: {e}")
    if _is_network_error(e):
        return ConvertError(_offline_message(repo_id, e))
    return ConvertError(f"cannot query {repo_id} on the Hugging Face Hub ({type(e).__name__}: {str(e)[:160]})")


def needed_files(siblings) -> list[tuple[str, int]]:
    """``[(filename, size)]`` of the repo files conversion needs."""
    out = []
    for s in siblings:
        name = s.rfilename
        if "/" in name:
            continue  # only top-level files
        if any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS):
            out.append((name, int(getattr(s, "size", None) or 0)))
    return out


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def _existing(path: Path) -> Path:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _same_disk(a: Path, b: Path) -> bool:
    try:
        return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev
    except OSError:
        return True


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_source(
    source: str | os.PathLike | None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    log=None,
    progress: bool = True,
    reserve: tuple[Path, int] | None = None,
) -> ResolvedSource:
    """A local folder ready for conversion (downloading from the Hub when SOURCE is a repo id).

    ``reserve=(out_dir, nbytes)``: space the conversion output will need; when ``out_dir`` is on
    the same disk as the download, both must fit before anything is downloaded.
    """
    log = log or (lambda msg: None)
    source = DEFAULT_REPO if source is None else os.fspath(source)
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConvertError(f"{source} is a file; SOURCE must be a checkpoint folder or a Hub repo id")
        if not (p / "config.json").exists():
            raise ConvertError(f"{source} has no config.json; is it a Hugging Face checkpoint folder?")
        return ResolvedSource(p)
    if looks_like_path(source):
        raise ConvertError(f"folder not found: {source}")

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ConvertError(
            f"{source!r} is neither an existing folder nor a Hugging Face repo id (owner/name)"
        ) from None
    repo_id = source
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - classified into one clear message
        raise _hub_error(repo_id, e) from None
    files = needed_files(info.siblings or [])
    if not any(n.endswith(".safetensors") for n, _ in files):
        raise ConvertError(f"{repo_id} has no .safetensors weights; it cannot be converted")
    sha = getattr(info, "sha", None) or revision
    target = Path(local_dir) if local_dir else _cache_root(Path(cache_dir) if cache_dir else None)
    missing = 0
    for name, size in files:
        if local_dir:
            have = (Path(local_dir) / name).exists()
        else:
            from huggingface_hub import try_to_load_from_cache

            have = isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=sha), str)
        if not have:
            missing += size
    total = sum(s for _, s in files)
    free = _free_bytes(target)
    extra = 0
    if reserve is not None and _same_disk(target, Path(reserve[0])):
        extra = int(reserve[1])
    if missing + extra > free:
        also = f" plus ~{extra / 1e9:.1f} GB for the converted output" if extra else ""
        raise ConvertError(
            f"{repo_id} needs {missing / 1e9:.1f} GB more to download ({total / 1e9:.1f} GB in all){also}, but "
            f"only {free / 1e9:.1f} GB are free at {target}; free space, set --download-dir to a bigger disk, "
            f"or download elsewhere and pass the folder"
        )
    log(f"downloading {repo_id} ({total / 1e9:.1f} GB, {missing / 1e9:.1f} GB not yet cached) to {target}")
    kwargs = dict(repo_id=repo_id, revision=sha, allow_patterns=ALLOW_PATTERNS)
    if local_dir:
        kwargs["local_dir"] = str(local_dir)
    if cache_dir:
        kwargs["cache_dir"] = str(cache_dir)
    watch = Path(local_dir) if local_dir else target / ("models--" + repo_id.replace("/", "--")) / "blobs"
    try:
        with _DownloadProgress(watch, missing, enabled=progress):
            path = snapshot_download(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(repo_id, e) from None
    return ResolvedSource(Path(path), repo_id, sha)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, n)):
                total += st.st_size
    return total


class _DownloadProgress:
    """A Rich progress bar (bytes) fed by polling the download folder; hides huggingface_hub's own bars."""

    def __init__(self, root: Path, total: int, enabled: bool = True, interval: float = 0.5):
        self.root, self.total, self.enabled, self.interval = Path(root), total, enabled, interval

    def __enter__(self):
        if not self.enabled or self.total <= 0:
            self.enabled = False
            return self
        import threading

        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
        from rich.progress import (
            BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
        )

        self._was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
        self._start = _tree_bytes(self.root) if self.root.exists() else 0
        self._bar = Progress(TextColumn("[bold]downloading"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn())
        self._task = self._bar.add_task("download", total=self.total)
        self._bar.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self):
        done = (_tree_bytes(self.root) if self.root.exists() else 0) - self._start
        self._bar.update(self._task, completed=max(0, min(done, self.total)))

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        from huggingface_hub.utils import enable_progress_bars

        self._stop.set()
        self._thread.join()
        self._update()
        self._bar.stop()
        if not self._was_disabled:
            enable_progress_bars()
        return False
