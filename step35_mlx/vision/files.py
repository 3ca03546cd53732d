"""Image files named by users (CLI ``--image``, ``/image``): checked before anything is loaded or sent."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def check_image_file(path: str | Path) -> Path:
    """``path`` as a ``Path`` when it is a file Pillow can decode; ``ValueError`` with the reason otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"image file {p} does not exist")
    if not p.is_file():
        raise ValueError(f"{p} is not a file")
    try:
        with Image.open(p) as im:
            im.verify()
    except Image.DecompressionBombError as e:
        raise ValueError(f"{p} is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{p} is not an image Pillow can read ({e})") from None
    return p


def has_vision(model: object) -> bool:
    """Whether ``model`` has a vision tower (a Step 3.7 checkpoint loaded with its vision tensors)."""
    return getattr(model, "vision", None) is not None


NO_VISION = ("this model has no vision tower, so it cannot take images (a Step 3.7 checkpoint has one "
             "unless it was converted or loaded without it)")
