"""Independent float64 NumPy reference of the Step 3.7 vision tower (encoder, downsamplers, projector).

Written from the architecture notes (``step37-vision.md``) on the *raw* checkpoint tensors
(``vision_model.conv1.weight`` ``[D, 3, 14, 14]``, fused ``in_proj``, 3x3 convolutions
``[out, in, 3, 3]``), with its own formulations: convolutions as explicit sums over kernel
offsets, RoPE as complex multiplication of interleaved pairs, per-pixel bilinear position
interpolation. Slow and simple on purpose; imported by the tests.
"""

from __future__ import annotations

import numpy as np


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _resize_positions(table: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``[g, g, D]`` -> ``[rows, cols, D]``, bilinear with half-pixel centres, edge-clamped."""
    g = table.shape[0]
    out = np.empty((rows, cols, table.shape[2]))
    for r in range(rows):
        y = max((r + 0.5) * g / rows - 0.5, 0.0)
        y0 = min(int(y), g - 1)
        y1, fy = min(y0 + 1, g - 1), y - y0
        for c in range(cols):
            x = max((c + 0.5) * g / cols - 0.5, 0.0)
            x0 = min(int(x), g - 1)
            x1, fx = min(x0 + 1, g - 1), x - x0
            out[r, c] = ((1 - fy) * ((1 - fx) * table[y0, x0] + fx * table[y0, x1])
                         + fy * ((1 - fx) * table[y1, x0] + fx * table[y1, x1]))
    return out


def _rope(x: np.ndarray, rows: int, cols: int, theta: float) -> np.ndarray:
    """``x`` ``[heads, N, hd]``: pair j = (2j, 2j+1) turns by col * f_j (j < hd/4) or row * f_{j - hd/4}."""
    hd = x.shape[-1]
    q = hd // 4
    f = theta ** (-4.0 * np.arange(q) / hd)
    r = np.repeat(np.arange(rows), cols)[:, None]
    c = np.tile(np.arange(cols), rows)[:, None]
    angle = np.concatenate([c * f, r * f], axis=1)  # [N, hd/2]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angle)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def _conv3x3_s2(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x`` ``[C, H, W]``, ``w`` ``[O, C, 3, 3]``: stride 2, zero padding 1."""
    C, H, W = x.shape
    Ho, Wo = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    xp = np.zeros((C, H + 2, W + 2))
    xp[:, 1:-1, 1:-1] = x
    out = np.zeros((w.shape[0], Ho, Wo)) + b[:, None, None]
    for i in range(3):
        for j in range(3):
            patch = xp[:, i : i + 2 * Ho : 2, j : j + 2 * Wo : 2][:, :Ho, :Wo]
            out += np.einsum("oc,chw->ohw", w[:, :, i, j], patch)
    return out


def reference_image_tokens(weights: dict[str, np.ndarray], vision_config: dict, pixels: np.ndarray,
                           prefix: str = "vision_model.", theta: float = 10000.0) -> np.ndarray:
    """Image tokens ``[B, (S/56)^2, text_hidden]`` of normalized pixels ``[B, 3, S, S]``, in float64."""
    W = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    proj_key = next(k for k in W if k.endswith("vit_large_projector.weight"))
    D, heads, p = vision_config["width"], vision_config["heads"], vision_config["patch_size"]
    eps = vision_config.get("layer_norm_eps", 1e-5)
    g = vision_config["image_size"] // p
    out = []
    for img in np.asarray(pixels, np.float64):
        rows, cols = img.shape[1] // p, img.shape[2] // p
        conv = W[prefix + "conv1.weight"]
        x = np.zeros((rows, cols, D))
        for i in range(p):
            for j in range(p):
                x += np.einsum("dc,chw->hwd", conv[:, :, i, j], img[:, i : rows * p : p, j : cols * p : p])
        x = x + _resize_positions(W[prefix + "positional_embedding"].reshape(g, g, D), rows, cols)
        x = x.reshape(rows * cols, D)
        x = _layer_norm(x, W[prefix + "ln_pre.weight"], W[prefix + "ln_pre.bias"], eps)
        for layer in range(vision_config["layers"]):
            b = f"{prefix}transformer.resblocks.{layer}."
            h = _layer_norm(x, W[b + "ln_1.weight"], W[b + "ln_1.bias"], eps)
            qkv = h @ W[b + "attn.in_proj_weight"].T + W[b + "attn.in_proj_bias"]
            q, k, v = (t.reshape(-1, heads, D // heads).transpose(1, 0, 2) for t in np.split(qkv, 3, axis=-1))
            q, k = _rope(q, rows, cols, theta), _rope(k, rows, cols, theta)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(D // heads)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            o = (a @ v).transpose(1, 0, 2).reshape(-1, D)
            o = o @ W[b + "attn.out_proj.weight"].T + W[b + "attn.out_proj.bias"]
            x = x + W[b + "ls_1.gamma"] * o
            h = _layer_norm(x, W[b + "ln_2.weight"], W[b + "ln_2.bias"], eps)
            h = h @ W[b + "mlp.c_fc.weight"].T + W[b + "mlp.c_fc.bias"]
            h = h / (1.0 + np.exp(-1.702 * h))
            x = x + W[b + "ls_2.gamma"] * (h @ W[b + "mlp.c_proj.weight"].T + W[b + "mlp.c_proj.bias"])
        grid = x.reshape(rows, cols, D).transpose(2, 0, 1)
        grid = _conv3x3_s2(grid, W[prefix + "vit_downsampler1.weight"], W[prefix + "vit_downsampler1.bias"])
        grid = _conv3x3_s2(grid, W[prefix + "vit_downsampler2.weight"], W[prefix + "vit_downsampler2.bias"])
        tokens = grid.reshape(grid.shape[0], -1).T
        out.append(tokens @ W[proj_key].T)
    return np.stack(out)
