"""Read parts of files in a Hugging Face repo with HTTP range requests, pinned to one commit.

Uses huggingface-hub's URL builder, session and auth headers (``hf_hub_url``,
``get_session``, ``build_hf_headers``), so ``HF_ENDPOINT``, tokens and proxies behave as
in ``hf download``. Every ranged answer must be ``206`` with a ``Content-Range`` that starts
where asked: a server that ignores ``Range`` (``200``) would start a whole-shard download,
and is refused before its body is read.
"""

from __future__ import annotations

import json
import re
import struct
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from ..safetensors_io import MAX_HEADER, SafetensorsError, TensorInfo, nbytes
from .source import ConvertError

CHUNK = 64 * 2**10  # small: an interrupted body keeps all but the last piece
_SHA = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class RemoteError(ConvertError):
    """The Hub (or the server at ``HF_ENDPOINT``) did not answer as a range-capable file host.

    ``unreachable`` is true when no answer came at all (connection refused, DNS, offline).
    """

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class RemoteHeader:
    """A remote safetensors file's header: its tensors (absolute offsets) and its size in bytes."""

    filename: str
    tensors: dict[str, TensorInfo]
    header_bytes: int


def _status_message(code: int, what: str, repo: str) -> str:
    if code in (401, 403):
        return f"HTTP {code} for {what}: {repo} is gated or private; accept its terms on huggingface.co and log in"
    if code == 404:
        return f"HTTP 404 for {what}: not found in {repo} at that revision"
    if code == 416:
        return (f"HTTP 416 (range not satisfiable) for {what}: the file is shorter than its header says; "
                "it changed or is damaged on the server")
    return f"HTTP {code} for {what}"


class RepoFiles:
    """Ranged and whole reads of one repo's files at one revision (resolved to a commit by :meth:`pin`)."""

    def __init__(self, repo: str, revision: str | None = None, *, endpoint: str | None = None,
                 token: str | bool | None = None):
        from huggingface_hub.utils import build_hf_headers, get_session

        self.repo = repo
        self.revision = revision or "main"
        self.endpoint = endpoint
        self.session = get_session()
        self.headers = build_hf_headers(token=token)
        self.received = 0  # bytes of response bodies read, all requests together

    def url(self, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, filename, revision=self.revision, endpoint=self.endpoint)

    @contextmanager
    def _get(self, filename: str, extra: dict | None = None) -> Iterator:
        headers = {**self.headers, **(extra or {})}
        url = self.url(filename)
        stack = ExitStack()
        try:
            if callable(getattr(self.session, "stream", None)):  # httpx client (huggingface-hub >= 1.0)
                r = stack.enter_context(self.session.stream("GET", url, headers=headers, follow_redirects=True))
            else:  # requests session (huggingface-hub 0.x)
                r = stack.enter_context(self.session.get(url, headers=headers, stream=True, allow_redirects=True))
        except Exception as e:  # noqa: BLE001 - connection errors of httpx or requests
            raise RemoteError(f"cannot read {filename} of {self.repo} from {url}: {type(e).__name__}: {e}",
                              unreachable=True) from None
        with stack:
            yield r

    @staticmethod
    def _chunks(r, size: int) -> Iterator[bytes]:
        """Body pieces as they arrive (httpx: unbuffered; requests: at most ``size``), so an interrupted
        download keeps almost everything it received."""
        return r.iter_bytes() if hasattr(r, "iter_bytes") else r.iter_content(size)

    def pin(self, filename: str) -> bytes:
        """Read ``filename`` whole at the requested revision and pin ``revision`` to the commit it came from.

        The commit is the ``X-Repo-Commit`` header the Hub sends with every resolved file; a
        revision already given as a 40-hex commit must agree with it.
        """
        with self._get(filename) as r:
            if r.status_code != 200:
                raise RemoteError(_status_message(r.status_code, f"{filename} at revision {self.revision}", self.repo))
            # the Hub sends it with the resolve answer, also when that answer is a redirect to its CDN
            commit = next((h.headers["x-repo-commit"].lower() for h in [*getattr(r, "history", []), r]
                           if h.headers.get("x-repo-commit")), "")
            data = b"".join(self._chunks(r, CHUNK))
        self.received += len(data)
        if commit and _SHA.match(commit):
            if _SHA.match(self.revision.lower()) and self.revision.lower() != commit:
                raise RemoteError(f"asked for revision {self.revision} of {self.repo} but the server sent {commit}")
            self.revision = commit
        elif not _SHA.match(self.revision.lower()):
            raise RemoteError(
                f"the server did not say which commit '{self.revision}' of {self.repo} is (no X-Repo-Commit header); "
                "pass --revision with a full 40-character commit hash"
            )
        return data

    @contextmanager
    def ranged(self, filename: str, start: int, end: int) -> Iterator:
        """An open response for bytes ``[start, end)`` of ``filename``; refuses anything but a matching 206."""
        what = f"bytes {start}-{end - 1} of {filename}"
        with self._get(filename, {"Range": f"bytes={start}-{end - 1}"}) as r:
            if r.status_code == 200:
                raise RemoteError(
                    f"the server ignored the Range request for {what} (HTTP 200 instead of 206) and would send the "
                    "whole file; refusing. Use a host that supports range requests (the Hub does)"
                )
            if r.status_code != 206:
                raise RemoteError(_status_message(r.status_code, what, self.repo))
            m = _CONTENT_RANGE.match(r.headers.get("content-range", ""))
            if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
                raise RemoteError(f"the server answered {what} with Content-Range "
                                  f"{r.headers.get('content-range')!r}; refusing a mismatched range")
            yield r

    def read_range(self, filename: str, start: int, end: int) -> bytes:
        with self.ranged(filename, start, end) as r:
            data = b"".join(self._chunks(r, CHUNK))
        self.received += len(data)
        if len(data) != end - start:
            raise RemoteError(f"short read: {len(data)} of {end - start} bytes from {filename}")
        return data

    def stream_range(self, filename: str, start: int, end: int, write: Callable[[bytes], None]) -> None:
        """Bytes ``[start, end)`` of ``filename`` handed to ``write`` as they arrive."""
        got = 0
        with self.ranged(filename, start, end) as r:
            chunks = iter(self._chunks(r, CHUNK))
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001 - connection dropped mid-body
                    raise RemoteError(f"download of {filename} interrupted after {got} of {end - start} bytes "
                                      f"({type(e).__name__}); rerun to resume") from None
                write(chunk)
                got += len(chunk)
                self.received += len(chunk)
        if got != end - start:
            raise RemoteError(f"download of {filename} interrupted after {got} of {end - start} bytes; rerun to resume")

    def header(self, filename: str) -> RemoteHeader:
        """A remote safetensors file's header, read with two range requests (length, then JSON)."""
        (n,) = struct.unpack("<Q", self.read_range(filename, 0, 8))
        if n > MAX_HEADER:
            raise RemoteError(f"{filename} of {self.repo} has a corrupt safetensors header (length {n})")
        try:
            header = json.loads(self.read_range(filename, 8, 8 + n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RemoteError(f"{filename} of {self.repo} has a corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        tensors = {}
        for name, meta in header.items():
            try:
                b, e = (int(x) for x in meta["data_offsets"])
                info = TensorInfo(name, meta["dtype"], tuple(int(d) for d in meta["shape"]), 8 + n + b, 8 + n + e)
                if e - b != nbytes(info.dtype, info.shape):
                    raise ValueError
            except (KeyError, TypeError, ValueError, SafetensorsError):
                raise RemoteError(f"{filename} of {self.repo}: corrupt header entry for {name!r}") from None
            tensors[name] = info
        return RemoteHeader(filename, tensors, 8 + n)
