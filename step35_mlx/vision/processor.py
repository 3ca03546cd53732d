"""Step 3.7 image preprocessing: a 728x728 global view plus a grid of 504x504 local crops.

Follows transformers' ``Step3p7ImageProcessor`` step by step (and vLLM's patcher, which agrees):
RGB (transparency composited on white), square zero-padding of tiny, very elongated images,
a uniform downscale above 3024 px, an aspect-dependent crop window, dimensions snapped to
window multiples, bilinear resampling throughout, then 1/255 and CLIP mean/std. Pillow and
NumPy only.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = Union[str, Path, bytes, "Image.Image"]


@dataclass(frozen=True)
class CropPlan:
    """How one image is cut: global-view size before squaring, crop canvas, window and grid."""

    global_size: tuple[int, int]  # (width, height) after padding / downscaling
    crop_size: tuple[int, int]  # (width, height) the image is resized to before cutting
    window: int  # crop side before the resize to 504; 0 = no local crops
    cols: int
    rows: int
    square_pad: bool

    @property
    def num_crops(self) -> int:
        return self.cols * self.rows


@dataclass(frozen=True)
class ProcessedImage:
    """Model inputs of one image: normalized float32 CHW views and the crop grid."""

    global_view: np.ndarray  # [3, image_size, image_size]
    crops: np.ndarray  # [num_crops, 3, crop_size, crop_size]
    plan: CropPlan
    digest: str  # sha256 of the RGB pixels and size: identifies the image for prefix reuse

    @property
    def num_crops(self) -> int:
        return int(self.crops.shape[0])

    def newline_after(self, i: int) -> bool:
        """True when crop ``i`` ends a grid row that is not the last."""
        return (i % self.plan.cols) == self.plan.cols - 1 and i // self.plan.cols < self.plan.rows - 1


def load_image(source: ImageSource) -> Image.Image:
    """A PIL image from a path, encoded bytes or a PIL image; converted to RGB.

    Transparency is composited onto white, as transformers does.
    """
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(bytes(source)))
    elif isinstance(source, (str, Path)):
        img = Image.open(Path(source))
    else:
        raise TypeError(f"an image must be a path, bytes or PIL.Image, got {type(source).__name__}")
    img.load()
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ImageProcessor:
    """Turns images into :class:`ProcessedImage` for the Step 3.7 vision tower."""

    def __init__(self, image_size: int = 728, crop_size: int = 504, max_image_size: int = 3024,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        self.image_size = image_size
        self.crop_size = crop_size
        self.max_image_size = max_image_size
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    def plan(self, width: int, height: int) -> CropPlan:
        """The crop layout for a ``width`` x ``height`` image (transformers' ``_plan_patches``)."""
        square_pad = min(width, height) < 32 and max(width / height, height / width) > 4
        if square_pad:
            width = height = max(width, height)
        if max(width, height) > self.max_image_size:
            scale = self.max_image_size / max(width, height)
            width, height = int(width * scale), int(height * scale)
        short, long = min(width, height), max(width, height)
        if long <= self.image_size:
            window = short if long / short > 1.5 else 0
        elif long / short > 4:
            window = min(short, self.crop_size)
        else:
            window = self.crop_size
        if window == 0:
            return CropPlan((width, height), (width, height), 0, 0, 0, square_pad)

        def snap(dim: int) -> int:
            if dim < window:
                return dim
            return window * (dim // window + (dim % window > 0.2 * window))

        cw, ch = snap(width), snap(height)
        return CropPlan((width, height), (cw, ch), window, max(1, cw // window), max(1, ch // window), square_pad)

    def _normalize(self, img: Image.Image) -> np.ndarray:
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
        return (x - self.mean) / self.std

    def __call__(self, source: ImageSource) -> ProcessedImage:
        img = load_image(source)
        digest = hashlib.sha256(f"{img.width}x{img.height}:".encode() + img.tobytes()).hexdigest()
        plan = self.plan(img.width, img.height)
        if plan.square_pad:
            side = max(img.width, img.height)
            canvas = Image.new("RGB", (side, side), (0, 0, 0))
            canvas.paste(img, (0, 0))
            img = canvas
        bilinear = Image.Resampling.BILINEAR
        global_img = img.resize(plan.global_size, bilinear).resize((self.image_size,) * 2, bilinear)
        crops = []
        if plan.window:
            canvas = img.resize(plan.crop_size, bilinear)
            w = plan.window
            for top in range(0, plan.crop_size[1], w):
                for left in range(0, plan.crop_size[0], w):
                    box = (left, top, min(left + w, plan.crop_size[0]), min(top + w, plan.crop_size[1]))
                    crops.append(self._normalize(canvas.crop(box).resize((self.crop_size,) * 2, bilinear)))
        stacked = (np.stack(crops) if crops
                   else np.zeros((0, 3, self.crop_size, self.crop_size), np.float32))
        return ProcessedImage(self._normalize(global_img), stacked, plan, digest)
