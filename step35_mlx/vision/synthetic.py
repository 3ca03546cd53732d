"""Small random Step 3.7 checkpoints (text + vision tower) in the release's raw key layout.

The vision tensors use the raw names (``vision_model.conv1.weight``,
``vision_model.transformer.resblocks.N.attn.in_proj_weight``, ...,
``vit_large_projector.weight``) and sit in their own ``model-vit-*`` shard, as in the
release; ``vision_prefix="model.vision_model."`` writes the other export's naming.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..synthetic import tiny_config, write_hf_checkpoint

if TYPE_CHECKING:
    from PIL import Image

VIT_SHARD = "model-vit-00001-of-00001.safetensors"


def tiny_vision_config(width: int = 32, layers: int = 2, heads: int = 2, mlp_ratio: float = 2.0,
                       image_size: int = 728, patch_size: int = 14) -> dict:
    """A ``vision_config`` dict with the release's field names at a narrow width."""
    return {
        "model_type": "perception_encoder", "width": width, "layers": layers, "heads": heads,
        "mlp_ratio": mlp_ratio, "image_size": image_size, "patch_size": patch_size,
        "hidden_act": "quick_gelu", "ls_init_value": 0.1, "layer_norm_eps": 1e-5,
    }


def step3p7_config(vision: dict | None = None, image_token_id: int = 11, **text_kwargs) -> dict:
    """A step3p7 ``config.json``: :func:`tiny_config` text model plus ``vision_config``."""
    cfg = tiny_config(model_type="step3p7", **text_kwargs)
    cfg["vision_config"] = vision or tiny_vision_config()
    cfg["image_token_id"] = image_token_id
    cfg["projector_bias"] = False
    return cfg


def random_vision_weights(config: dict, seed: int = 0, prefix: str = "vision_model.") -> dict[str, np.ndarray]:
    """Raw-layout float32 vision tensors for a step3p7 ``config`` (encoder, downsamplers, projector)."""
    vc = config["vision_config"]
    D, L, p = vc["width"], vc["layers"], vc["patch_size"]
    F = int(round(D * vc["mlp_ratio"]))
    g = vc["image_size"] // p
    H = config["text_config"]["hidden_size"]
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "conv1.weight": ((D, 3, p, p), "linear"),
        "positional_embedding": ((g * g, D), "embed"),
        "ln_pre.weight": ((D,), "scale"), "ln_pre.bias": ((D,), "bias"),
        "vit_downsampler1.weight": ((2 * D, D, 3, 3), "linear"), "vit_downsampler1.bias": ((2 * D,), "bias"),
        "vit_downsampler2.weight": ((4 * D, 2 * D, 3, 3), "linear"), "vit_downsampler2.bias": ((4 * D,), "bias"),
    }
    for i in range(L):
        b = f"transformer.resblocks.{i}."
        shapes.update({
            b + "attn.in_proj_weight": ((3 * D, D), "linear"), b + "attn.in_proj_bias": ((3 * D,), "bias"),
            b + "attn.out_proj.weight": ((D, D), "linear"), b + "attn.out_proj.bias": ((D,), "bias"),
            b + "ln_1.weight": ((D,), "scale"), b + "ln_1.bias": ((D,), "bias"),
            b + "ln_2.weight": ((D,), "scale"), b + "ln_2.bias": ((D,), "bias"),
            b + "ls_1.gamma": ((D,), "scale"), b + "ls_2.gamma": ((D,), "scale"),
            b + "mlp.c_fc.weight": ((F, D), "linear"), b + "mlp.c_fc.bias": ((F,), "bias"),
            b + "mlp.c_proj.weight": ((D, F), "linear"), b + "mlp.c_proj.bias": ((D,), "bias"),
        })
    out = {}
    for name, (shape, kind) in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        x = rng.standard_normal(shape, dtype=np.float32)
        if kind == "linear":
            x *= np.float32(1.0 / np.sqrt(np.prod(shape[1:])))
        elif kind == "scale":
            x = np.float32(1.0) + np.float32(0.2) * x
        elif kind == "bias":
            x *= np.float32(0.1)
        out[prefix + name] = x
    rng = np.random.default_rng([seed, zlib.crc32(b"vit_large_projector.weight")])
    proj = rng.standard_normal((H, 4 * D), dtype=np.float32) * np.float32(1.0 / np.sqrt(4 * D))
    out[("model." if prefix.startswith("model.") else "") + "vit_large_projector.weight"] = proj
    return out


def write_step3p7_checkpoint(path: str | Path, config: dict, *, seed: int = 0,
                             vision_prefix: str = "vision_model.", dtype: str = "float32") -> dict[str, np.ndarray]:
    """Write a full step3p7 folder: text shards via :func:`write_hf_checkpoint` plus a ``model-vit`` shard.

    Returns the stored float32 tensors, text under ``model.``-style names and vision under raw names.
    """
    import mlx.core as mx

    path = Path(path)
    stored = write_hf_checkpoint(path, config, seed=seed, dtype=dtype, num_shards=2)
    vision = random_vision_weights(config, seed=seed, prefix=vision_prefix)
    mx_dtype = mx.bfloat16 if dtype == "bfloat16" else mx.float32
    arrays = {k: mx.array(v).astype(mx_dtype) for k, v in vision.items()}
    mx.save_safetensors(str(path / VIT_SHARD), arrays, metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: VIT_SHARD for k in arrays})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    index["metadata"]["total_size"] += sum(int(a.nbytes) for a in arrays.values())
    index_path.write_text(json.dumps(index, indent=2))
    stored.update({k: np.array(a.astype(mx.float32)) for k, a in arrays.items()})
    return stored


def sample_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test picture: smooth gradients plus a tiled 61x67 noise patch (NumPy's PCG64)."""
    from PIL import Image

    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    base = np.empty((height, width, 3), np.float32)
    base[..., 0] = x * (255.0 / max(width - 1, 1))
    base[..., 1] = y * (255.0 / max(height - 1, 1))
    base[..., 2] = 127.5 + 127.5 * np.sin((x + 2 * y) / 17.0)
    noise = np.random.default_rng(seed).integers(-24, 25, size=(61, 67, 3)).astype(np.float32)
    base += np.tile(noise, (height // 61 + 1, width // 67 + 1, 1))[:height, :width]
    return Image.fromarray(np.clip(np.rint(base), 0, 255).astype(np.uint8))


def synthetic_pixels(n: int, side: int, seed: int) -> np.ndarray:
    """``[n, 3, side, side]`` float32 normalized-pixel stand-ins, reproducible anywhere from ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, side, side), dtype=np.float32)


IMAGE_MARKERS = ("<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>")


def write_vision_tokenizer(path: str | Path) -> dict[str, int]:
    """Copy the demo model's tokenizer (it has ``<im_patch>``) into ``path`` and add the other image markers.

    The markers become special added tokens after the demo vocabulary; returns every marker's id.
    A model using it needs ``vocab_size >= 2048 + 5``.
    """
    from ..hub import DEMO_DIR

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = json.loads((DEMO_DIR / "tokenizer.json").read_text())
    next_id = max([a["id"] for a in tok["added_tokens"]] + list(tok["model"]["vocab"].values())) + 1
    ids = {a["content"]: a["id"] for a in tok["added_tokens"] if a["content"] == "<im_patch>"}
    cfg = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())
    for i, marker in enumerate(IMAGE_MARKERS):
        entry = {"id": next_id + i, "content": marker, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": True}
        tok["added_tokens"].append(entry)
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"][str(next_id + i)] = {k: v for k, v in entry.items() if k != "id"}
        ids[marker] = next_id + i
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    for name in ("special_tokens_map.json", "chat_template.jinja"):
        (path / name).write_bytes((DEMO_DIR / name).read_bytes())
    return ids
