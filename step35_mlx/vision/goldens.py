"""Fixed inputs shared by ``scripts/make_vision_goldens.py`` and the tests that check against its output."""

from __future__ import annotations

import numpy as np

from .synthetic import step3p7_config

# Token ids of the image markers in the tiny golden vocabulary (256 ids).
SPECIAL_IDS = {"<im_patch>": 11, "<im_start>": 12, "<im_end>": 13, "<patch_start>": 14,
               "<patch_end>": 15, "<patch_newline>": 16}
GOLDEN_CONFIG = step3p7_config(image_token_id=SPECIAL_IDS["<im_patch>"], num_mtp=0, sliding_window=4096)

# (width, height): square, 4:3, 16:9, tall, tiny, elongated, tiny and elongated (square-padded),
# very elongated, over 3024 px (4:3 and square), near-square just over one window, wide over 3024.
PROCESSOR_SHAPES = ((728, 728), (1024, 768), (1920, 1080), (480, 1200), (40, 30), (200, 64),
                    (20, 200), (2000, 300), (4032, 3024), (3024, 3024), (1000, 20), (800, 700),
                    (3500, 600))

# The two images of the logits golden: (crops, newline after crop i); 2x2 grid, then global only.
PROMPT_IMAGES = ((4, [False, True, False, False]), (0, []))


def prompt_text_ids(part: int) -> list[int]:
    """Text tokens around the images (ids 20..255, never an image marker)."""
    rng = np.random.default_rng(100 + part)
    return [int(t) for t in rng.integers(20, 256, size=5 + 3 * part)]


def logit_rows(n: int) -> list[int]:
    """Rows of the logits kept in the golden: every 16th position plus the last 8."""
    return sorted(set(range(0, n, 16)) | set(range(n - 8, n)))
