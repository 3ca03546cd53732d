"""Images in API requests: OpenAI ``image_url`` parts and Anthropic ``image`` blocks, under limits.

Accepted sources: ``data:`` URLs / base64 blocks always; local files (``file://`` URLs or
absolute paths) only with ``allow_local``; ``http(s)`` URLs only with ``allow_remote``.
Every image is decoded once here (so a broken one is a 400, not a failure mid-generation)
and counted against ``max_images`` and ``max_image_bytes`` / ``max_pixels``. A model
without a vision tower refuses any image with a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import APIError

NO_VISION = "this model has no vision tower, so it does not accept images"


@dataclass(frozen=True)
class ImagePolicy:
    """What a server accepts: whether images at all, from where, how many and how large."""

    enabled: bool = False
    allow_local: bool = False
    allow_remote: bool = False
    max_images: int = 8
    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 50_000_000
    remote_timeout: float = 10.0


class ImageReader:
    """Reads the images of one request, counting them against the policy's limits."""

    def __init__(self, policy: ImagePolicy):
        self.policy = policy
        self.count = 0

    def openai(self, part: dict, where: str) -> bytes:
        self._require_vision(where)
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{where}: an image_url part needs image_url.url", param=where)
        return self._url(url, where)

    def anthropic(self, block: dict, where: str) -> bytes:
        self._require_vision(where)
        source = block.get("source")
        if not isinstance(source, dict):
            raise APIError(400, f"{where}: an image block needs a 'source' object", param=where)
        kind = source.get("type")
        if kind == "base64":
            return self._checked(self._b64(source.get("data"), where), where)
        if kind == "url":
            return self._url(str(source.get("url") or ""), where)
        raise APIError(400, f"{where}: image source type {kind!r} is not supported (base64, url)", param=where)

    # ------------------------------------------------------------ sources

    def _url(self, url: str, where: str) -> bytes:
        if url.startswith("data:"):
            head, sep, payload = url.partition(",")
            if not sep or not head.endswith(";base64"):
                raise APIError(400, f"{where}: a data URL must be base64 (data:image/...;base64,...)", param=where)
            return self._checked(self._b64(payload, where), where)
        if url.startswith(("http://", "https://")):
            if not self.policy.allow_remote:
                raise APIError(400, f"{where}: remote image URLs are off (start the server with "
                                    "--allow-remote-images)", param=where)
            return self._checked(self._fetch(url, where), where)
        if url.startswith("file://") or url.startswith("/"):
            if not self.policy.allow_local:
                raise APIError(400, f"{where}: local image files are off (start the server with "
                                    "--allow-local-images)", param=where)
            return self._checked(self._file(Path(url[len("file://"):] if url.startswith("file://") else url),
                                            where), where)
        raise APIError(400, f"{where}: unsupported image URL (use a data: URL"
                            + (", an http(s) URL" if self.policy.allow_remote else "")
                            + (", a file:// URL" if self.policy.allow_local else "") + ")", param=where)

    def _b64(self, data: Any, where: str) -> bytes:
        if not isinstance(data, str):
            raise APIError(400, f"{where}: image data must be a base64 string", param=where)
        if len(data) > self.policy.max_image_bytes * 4 // 3 + 4:
            raise self._too_large(where)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: image data is not valid base64", param=where) from None

    def _file(self, path: Path, where: str) -> bytes:
        try:
            if path.stat().st_size > self.policy.max_image_bytes:
                raise self._too_large(where)
            return path.read_bytes()
        except OSError as e:
            raise APIError(400, f"{where}: cannot read image file {path}: {e.strerror or e}", param=where) from None

    def _fetch(self, url: str, where: str) -> bytes:
        limit = self.policy.max_image_bytes
        try:
            with urllib.request.urlopen(url, timeout=self.policy.remote_timeout) as r:  # noqa: S310 - opt-in
                data = r.read(limit + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise APIError(400, f"{where}: cannot fetch image {url}: {getattr(e, 'reason', e)}", param=where) from None
        if len(data) > limit:
            raise self._too_large(where)
        return data

    # ------------------------------------------------------------ checks

    def _require_vision(self, where: str) -> None:
        if not self.policy.enabled:
            raise APIError(400, NO_VISION, param=where)

    def _too_large(self, where: str) -> APIError:
        return APIError(400, f"{where}: image larger than {self.policy.max_image_bytes / 2**20:g} MiB", param=where)

    def _checked(self, data: bytes, where: str) -> bytes:
        self.count += 1
        if self.count > self.policy.max_images:
            raise APIError(400, f"{where}: more than {self.policy.max_images} images in one request", param=where)
        if len(data) > self.policy.max_image_bytes:
            raise self._too_large(where)
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > self.policy.max_pixels:
                    raise APIError(400, f"{where}: image has {im.width}x{im.height} pixels, more than "
                                        f"{self.policy.max_pixels:,}", param=where)
                im.verify()
        except APIError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise APIError(400, f"{where}: not a readable image ({e})", param=where) from None
        return data
