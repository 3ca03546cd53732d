"""Compute and memory of the vision tower per view: FLOPs for speed projections, peak activations for plans."""

from __future__ import annotations

from dataclasses import dataclass

from .config import VisionConfig


@dataclass(frozen=True)
class ViewCost:
    """One view (``side`` x ``side`` pixels) through encoder + projector."""

    side: int
    patches: int
    tokens: int
    flops: int  # multiply-adds x 2
    activation_bytes: int  # peak transient working set


def view_cost(cfg: VisionConfig, side: int, act_bytes: int = 2, fused_attention: bool = True) -> ViewCost:
    """FLOPs and peak activation bytes for one view; views are encoded one at a time."""
    g = side // cfg.patch_size
    N, D, F, H = g * g, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    g1 = (g + 1) // 2
    g2 = (g1 + 1) // 2
    patch = 2 * N * (3 * cfg.patch_size ** 2) * D
    per_layer = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * D * F + 2 * 2 * N * N * D
    down1 = 2 * g1 * g1 * (9 * D) * (2 * D)
    down2 = 2 * g2 * g2 * (9 * 2 * D) * (4 * D)
    proj = 2 * g2 * g2 * (4 * D) * cfg.text_hidden_size
    flops = patch + cfg.num_layers * per_layer + down1 + down2 + proj
    stream = 6 * N * D * act_bytes  # residual, norm output, q/k/v, attention output
    scores = 0 if fused_attention else H * N * N * 4  # float32 softmax over the unfused scores
    mlp = 2 * N * F * act_bytes
    layer = stream + max(scores + 3 * N * D * act_bytes, mlp)
    im2col = max(g1 * g1 * 9 * D, g2 * g2 * 9 * 2 * D) * act_bytes
    return ViewCost(side, N, g2 * g2, flops, max(layer, stream + im2col))
