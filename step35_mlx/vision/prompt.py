"""Image placeholders in prompts: token ids from the tokenizer, expansion, and the embedding merge.

The chat template emits one ``<im_patch>`` per image. Each becomes
``[<patch_start> 81 x <im_patch> <patch_end> (+ <patch_newline> after each crop row but the last)]``
per crop, then ``<im_start> 169 x <im_patch> <im_end>`` for the global view; the image's
features fill its ``<im_patch>`` positions in that order. Positions stay 1-D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .processor import ProcessedImage

MARKERS = ("<im_patch>", "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>")


@dataclass(frozen=True)
class ImageTokens:
    """Ids of the image markers, read from the checkpoint's tokenizer."""

    im_patch: int
    im_start: int
    im_end: int
    patch_start: int
    patch_end: int
    patch_newline: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ImageTokens":
        """Look every marker up in ``tokenizer``; ``ValueError`` naming the first one it lacks."""
        vocab = tokenizer.get_vocab()
        ids = []
        for marker in MARKERS:
            if marker not in vocab:
                raise ValueError(f"the tokenizer has no {marker} token; it is not a Step 3.7 vision tokenizer")
            ids.append(int(vocab[marker]))
        return cls(*ids)


def expansion(image: ProcessedImage, tokens: ImageTokens, global_tokens: int, crop_tokens: int) -> list[int]:
    """The token ids that replace one image's ``<im_patch>`` placeholder."""
    out: list[int] = []
    for i in range(image.num_crops):
        out += [tokens.patch_start] + [tokens.im_patch] * crop_tokens + [tokens.patch_end]
        if image.newline_after(i):
            out.append(tokens.patch_newline)
    return out + [tokens.im_start] + [tokens.im_patch] * global_tokens + [tokens.im_end]


def merge_features(embeddings: mx.array, tokens: mx.array, features: mx.array, image_token_id: int) -> mx.array:
    """Put ``features`` ``[n, H]`` at the ``image_token_id`` positions of ``embeddings`` ``[B, T, H]``, in order."""
    mask = tokens == image_token_id
    n = int(mask.sum().item())
    if n != features.shape[0]:
        raise ValueError(f"{n} image-token positions but {features.shape[0]} image feature rows")
    if n == 0:
        return embeddings
    index = mx.maximum(mx.cumsum(mask.reshape(-1).astype(mx.int32)) - 1, 0).reshape(mask.shape)
    return mx.where(mask[..., None], features[index].astype(embeddings.dtype), embeddings)
