"""Write the Step 3.7 vision goldens in tests/data/ from transformers' own Step3p7 code (run by hand).

Needs torch, torchvision and transformers >= 5.24 (not needed by CI). Builds the small random step3p7
checkpoint the tests rebuild (``write_step3p7_checkpoint(config=GOLDEN_CONFIG, seed=0)``), loads it
with ``Step3p7ForConditionalGeneration.from_pretrained`` (so transformers applies its own key
renames and RoPE row permutation), and saves:

- ``vision_processor.npz``: per image shape, crop grid, token count of the expanded placeholder,
  and the 8-bit pixel levels of the global view and of the first and last crop (every 16th pixel).
- ``vision_features.npz``: image features (encoder + downsamplers + projector) of a 728 view and
  two 504 crops, from seeded pixels at the real geometry.
- ``vision_logits.npz``: logits of a prompt with two images (4 crops + global, then global only).

    python scripts/make_vision_goldens.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import Step3p7ForConditionalGeneration  # noqa: E402
from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor  # noqa: E402

from step35_mlx.vision.goldens import (  # noqa: E402
    GOLDEN_CONFIG, logit_rows, PROCESSOR_SHAPES, PROMPT_IMAGES, SPECIAL_IDS, prompt_text_ids,
)
from step35_mlx.vision.processor import CLIP_MEAN, CLIP_STD  # noqa: E402
from step35_mlx.vision.synthetic import synthetic_pixels, sample_image, write_step3p7_checkpoint  # noqa: E402

OUT = ROOT / "tests" / "data"
STRIDE = 16


def levels(x: torch.Tensor) -> np.ndarray:
    """Normalized float pixels back to 8-bit levels (exact: transformers resizes in uint8)."""
    mean = np.array(CLIP_MEAN, np.float64).reshape(3, 1, 1)
    std = np.array(CLIP_STD, np.float64).reshape(3, 1, 1)
    u = np.rint((x.double().numpy() * std + mean) * 255.0)
    return u[:, ::STRIDE, ::STRIDE].astype(np.uint8)


def expansion_ids(num_crops: int, newline_mask: list[bool]) -> list[int]:
    """transformers' placeholder expansion (Step3p7Processor.replace_image_token), mapped to ids."""
    feat_global, feat_patch = 169, 81
    toks = []
    for i in range(num_crops):
        toks += ["<patch_start>"] + ["<im_patch>"] * feat_patch + ["<patch_end>"]
        if newline_mask and newline_mask[i]:
            toks.append("<patch_newline>")
    toks += ["<im_start>"] + ["<im_patch>"] * feat_global + ["<im_end>"]
    return [SPECIAL_IDS[t] for t in toks]


def processor_goldens(proc: Step3p7ImageProcessor) -> None:
    out: dict[str, np.ndarray] = {}
    for w, h in PROCESSOR_SHAPES:
        r = proc(sample_image(w, h, seed=w * 7 + h), return_tensors="pt")
        n = int(r["num_local_patches"][0])
        mask = list(r["patch_newline_masks"][0][:n]) if n else []
        key = f"{w}x{h}"
        out[key + "/crops"] = np.array(n)
        out[key + "/newlines"] = np.array(int(sum(mask)))
        out[key + "/tokens"] = np.array(len(expansion_ids(n, mask)))
        out[key + "/global"] = levels(r["pixel_values"][0])
        if n:
            local = r["pixel_values_local"]
            out[key + "/crop_first"] = levels(local[0])
            out[key + "/crop_last"] = levels(local[n - 1])
    np.savez_compressed(OUT / "vision_processor.npz", **out)


def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    proc = Step3p7ImageProcessor()
    processor_goldens(proc)
    with tempfile.TemporaryDirectory() as tmp:
        write_step3p7_checkpoint(tmp, GOLDEN_CONFIG, seed=0)
        model = Step3p7ForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            glob = torch.from_numpy(synthetic_pixels(1, 728, seed=1))
            crops = torch.from_numpy(synthetic_pixels(2, 504, seed=2))
            feats = model.model.get_image_features(glob, crops, [2]).pooler_output[0]
            np.savez_compressed(OUT / "vision_features.npz", features=feats.numpy())

            pixel_global, pixel_local, num_local, ids = [], [], [], prompt_text_ids(0)
            for k, (n_crops, mask) in enumerate(PROMPT_IMAGES):
                pixel_global.append(synthetic_pixels(1, 728, seed=10 + k))
                if n_crops:
                    pixel_local.append(synthetic_pixels(n_crops, 504, seed=20 + k))
                num_local.append(n_crops)
                ids += expansion_ids(n_crops, mask) + prompt_text_ids(k + 1)
            out = model(
                input_ids=torch.tensor([ids]),
                pixel_values=torch.from_numpy(np.concatenate(pixel_global)),
                pixel_values_local=torch.from_numpy(np.concatenate(pixel_local)),
                num_local_patches=num_local,
            )
            logits = out.logits[0].numpy()
            rows = logit_rows(len(ids))
            np.savez_compressed(OUT / "vision_logits.npz", ids=np.array(ids), rows=np.array(rows),
                                logits=logits[rows])
    for f in sorted(OUT.glob("vision_*.npz")):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
