"""Images in chat messages: collect them, expand their placeholders, and feed their features to the model.

A message's ``content`` may be a list of parts; ``{"type": "image", "image": SOURCE}`` parts
(SOURCE: a path, encoded bytes or a ``PIL.Image``) are images, rendered by the chat template
as one ``<im_patch>`` each. :func:`prepare` turns the rendered ids into the expanded prompt
and wraps the model in :class:`ImageInputModel`, which swaps the image features in at the
image-token positions while the prompt is prefilled (any chunking, any cached prefix).

Prefix reuse compares ``ImagePrompt.keys``: the ids with each image's positions replaced by
a negative number derived from a hash of its pixels, so a changed image never matches a
cached one although every image token has the same id.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..model import check_token_ids
from .files import NO_VISION, has_vision
from .processor import ImageProcessor, ImageSource, ProcessedImage
from .prompt import ImageTokens, expansion

IMAGE_TYPES = ("image",)


def image_sources(messages: Any) -> list[ImageSource]:
    """Image sources of chat messages in rendering order (``[]`` for text prompts)."""
    if not isinstance(messages, (list, tuple)):
        return []
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, (list, tuple)):
            out += [part["image"] for part in content
                    if isinstance(part, dict) and part.get("type") in IMAGE_TYPES and "image" in part]
    return out


def content_key(digest: str) -> int:
    """A negative stand-in id for an image's tokens in prefix comparisons (never a real token id; fits int32)."""
    return -1 - int(hashlib.sha256(digest.encode()).hexdigest()[:8], 16) % (2**31 - 1)


@dataclass(frozen=True)
class ImagePrompt:
    """An expanded prompt: ``ids`` for the model, ``keys`` for prefix reuse, and where each image sits."""

    ids: list[int]
    keys: list[int]
    images: list[ProcessedImage]
    positions: np.ndarray  # every image-token position, in feature order

    def image_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions in ``[start, stop)`` that take image features, and the feature row of each."""
        lo, hi = np.searchsorted(self.positions, [start, stop])
        return self.positions[lo:hi], np.arange(lo, hi)


def expand(ids: Sequence[int], images: Sequence[ProcessedImage], tokens: ImageTokens,
           global_tokens: int, crop_tokens: int) -> ImagePrompt:
    """Expand every ``<im_patch>`` of ``ids`` (one per image, in order) into its image's token block."""
    slots = [i for i, t in enumerate(ids) if t == tokens.im_patch]
    if len(slots) != len(images):
        raise ValueError(f"the prompt has {len(slots)} image placeholder(s) but {len(images)} image(s)")
    out: list[int] = []
    keys: list[int] = []
    start = 0
    for slot, image in zip(slots, images):
        out += ids[start:slot]
        keys += ids[start:slot]
        block = expansion(image, tokens, global_tokens, crop_tokens)
        key = content_key(image.digest)
        keys += [key if t == tokens.im_patch else t for t in block]
        out += block
        start = slot + 1
    out += ids[start:]
    keys += ids[start:]
    positions = np.array([i for i, t in enumerate(out) if t == tokens.im_patch], dtype=np.int64)
    return ImagePrompt(out, keys, list(images), positions)


class FeatureCache:
    """Image features by pixel digest (most recent ``capacity`` images), so a turn re-encodes only new images."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._store: OrderedDict[str, mx.array] = OrderedDict()
        self.encoded = 0  # images run through the vision tower

    def get(self, model: Any, image: ProcessedImage) -> mx.array:
        feats = self._store.get(image.digest)
        if feats is None:
            feats = model.vision.image_features(image)
            mx.eval(feats)
            self.encoded += 1
            self._store[image.digest] = feats
            while len(self._store) > self.capacity:
                self._store.popitem(last=False)
        self._store.move_to_end(image.digest)
        return feats


class ImageInputModel:
    """The model, with image features at the prompt's image-token positions; everything else passes through.

    The absolute position of a forward's first token is the first cache's offset, so chunked
    prefill and a reused prefix need no bookkeeping here. Only images with positions in the
    chunk are encoded (once, through ``features``).
    """

    def __init__(self, model: Any, prompt: ImagePrompt, features: FeatureCache):
        self._model = model
        self._prompt = prompt
        self._features = features
        cfg = model.vision.config
        per_image = [im.num_crops * cfg.tokens_per_view(cfg.crop_size) + cfg.tokens_per_view(cfg.image_size)
                     for im in prompt.images]
        self._bounds = np.cumsum([0] + per_image)
        if self._bounds[-1] != prompt.positions.size:
            raise ValueError(f"{prompt.positions.size} image-token positions for {self._bounds[-1]} feature rows")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _image_features(self, rows: np.ndarray) -> mx.array:
        """Feature rows ``rows`` (indices over all the prompt's image tokens) as one ``[n, H]`` array."""
        parts = []
        for k, image in enumerate(self._prompt.images):
            lo, hi = self._bounds[k], self._bounds[k + 1]
            sel = rows[(rows >= lo) & (rows < hi)]
            if sel.size:
                parts.append(self._features.get(self._model, image)[mx.array(sel - lo)])
        return mx.concatenate(parts)

    def trunk(self, tokens: mx.array, cache: list | None = None,
              input_embeddings: mx.array | None = None) -> mx.array:
        """The wrapped model's ``trunk`` with image features at this chunk's image-token positions."""
        start = cache[0].offset if cache else 0
        positions, rows = self._prompt.image_rows(start, start + tokens.shape[1])
        if input_embeddings is None and positions.size:
            emb = self._model.model.embed_tokens(tokens)
            feats = self._image_features(rows).astype(emb.dtype)
            index = np.full(tokens.shape[1], -1, dtype=np.int64)
            index[positions - start] = np.arange(positions.size)
            mask = mx.array(index >= 0)[None, :, None]
            gathered = feats[mx.array(np.maximum(index, 0))][None]
            input_embeddings = mx.where(mask, gathered, emb)
        return self._model.trunk(tokens, cache, input_embeddings)

    def forward_hidden(self, tokens: mx.array, cache: list | None = None,
                       input_embeddings: mx.array | None = None) -> mx.array:
        check_token_ids(tokens, self._model.config.vocab_size)
        return self.trunk(tokens, cache, input_embeddings)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        return self._model.logits(self.forward_hidden(tokens, cache))


@dataclass(frozen=True)
class PreparedPrompt:
    """What to run for a rendered prompt: the model (wrapped when there are images), the ids it
    sees, and the ids prefix reuse compares (image tokens carry their image's pixel hash)."""

    model: Any
    ids: list[int]
    keys: list[int]
    images: ImagePrompt | None = None


def prepare(model: Any, tokenizer: Any, messages: Any, ids: list[int], features: FeatureCache | None = None,
            processor: ImageProcessor | None = None) -> PreparedPrompt:
    """The prompt to run for rendered ``ids`` of ``messages``; unchanged (model, ids) without images.

    Raises ``ValueError`` when the messages hold images but the model has no vision tower.
    """
    ids = list(ids)
    sources = image_sources(messages)
    if not sources:
        return PreparedPrompt(model, ids, ids)
    if not has_vision(model):
        raise ValueError(NO_VISION)
    cfg = model.vision.config
    processor = processor or ImageProcessor(cfg.image_size, cfg.crop_size)
    images = [processor(s) for s in sources]
    tokens = ImageTokens.from_tokenizer(tokenizer)
    prompt = expand(ids, images, tokens, cfg.tokens_per_view(cfg.image_size), cfg.tokens_per_view(cfg.crop_size))
    return PreparedPrompt(ImageInputModel(model, prompt, features or FeatureCache()), prompt.ids, prompt.keys,
                          prompt)
