"""Find a model folder from what a user typed: ``demo``, a local path, or a Hugging Face repo id."""

from __future__ import annotations

from pathlib import Path

DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).resolve().parent / "demo" / "model"
# Files a chat/generate run needs from a Hub repo (weights, configs, tokenizer, template).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


class ModelNotFoundError(FileNotFoundError):
    """The model a user named cannot be found (message says why and what to do)."""


def _looks_like_repo(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "~"))
        and all(all(ch.isalnum() or ch in "-_." for ch in p) for p in parts)
    )


def resolve_model(name: str | Path | None, *, allow_download: bool = True) -> Path:
    """The local folder of a model.

    - ``"demo"`` (or ``None``): the bundled demo model ``step35_mlx/demo/model``;
    - an existing folder: that folder;
    - ``owner/name`` that is not a local path: the Hugging Face snapshot, from the local
      cache first, then downloaded (only the files a run needs).

    Raises :class:`ModelNotFoundError` with a message meant for the user.
    """
    if name is None or str(name) == DEMO_NAME:
        if not (DEMO_DIR / "config.json").is_file():
            raise ModelNotFoundError(
                f"the bundled demo model is not installed ({DEMO_DIR} has no config.json); "
                "pass --model PATH or a Hugging Face repo id"
            )
        return DEMO_DIR
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; it is not a model folder")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the model folder that holds config.json")
    if not _looks_like_repo(text):
        raise ModelNotFoundError(f"model folder {text} does not exist")
    return _from_hub(text, allow_download)


def _from_hub(repo: str, allow_download: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a hard dependency
        raise ModelNotFoundError(f"{repo} looks like a Hugging Face repo but huggingface_hub is missing ({e})")
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if not allow_download:
        raise ModelNotFoundError(f"{repo} is not a local folder and not in the Hugging Face cache")
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is gated on Hugging Face: accept its terms on huggingface.co and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo} is not a local folder and was not found on Hugging Face (check the spelling, or log in for a private repo)"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{repo} is not a local folder or in the Hugging Face cache, and the Hub cannot be reached (offline?)"
        ) from None
    except Exception as e:  # network and HTTP errors of several libraries
        raise ModelNotFoundError(f"could not download {repo} from Hugging Face: {type(e).__name__}: {e}") from None
