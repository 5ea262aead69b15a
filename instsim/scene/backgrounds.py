"""Procedural backgrounds for detection images, and compositing objects over them.

The target domain and the synthetic training sets draw backgrounds from the same *kind* of generator
(smooth colour gradients, low-frequency noise, stripes and clutter shapes) but from different seeds, so a
detector never sees a target background while training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BOX_OPACITY", "random_backgrounds", "composite", "composite_premultiplied", "boxes_from_alpha"]


def _gradient(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Linear colour gradients in random directions: ``(n, 3, size, size)``."""
    c0, c1 = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    ang = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    lin = torch.linspace(-0.5, 0.5, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    t = (torch.cos(ang) * xx + torch.sin(ang) * yy + 0.5).clamp(0, 1)
    return c0 + (c1 - c0) * t


def _noise(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Smooth colour noise: a coarse random grid upsampled bicubically, ``(n, 3, size, size)``."""
    cells = int(torch.randint(3, 9, (1,), generator=g))
    coarse = torch.rand(n, 3, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _stripes(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Soft stripes of two colours at random angle and frequency, ``(n, 3, size, size)``."""
    c0, c1 = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    ang = torch.rand(n, 1, 1, 1, generator=g) * math.pi
    freq = 2 + torch.rand(n, 1, 1, 1, generator=g) * 6
    lin = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    t = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (torch.cos(ang) * xx + torch.sin(ang) * yy))
    return c0 + (c1 - c0) * t


def _clutter(base: torch.Tensor, g: torch.Generator, max_shapes: int = 6) -> torch.Tensor:
    """Add random soft ellipses and rectangles (distractors) onto ``base`` ``(n, 3, s, s)``."""
    n, _, s, _ = base.shape
    lin = torch.linspace(0, 1, s)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    out = base.clone()
    for _ in range(int(torch.randint(1, max_shapes + 1, (1,), generator=g))):
        cx, cy = torch.rand(n, 1, 1, generator=g), torch.rand(n, 1, 1, generator=g)
        rx, ry = 0.03 + 0.2 * torch.rand(n, 1, 1, generator=g), 0.03 + 0.2 * torch.rand(n, 1, 1, generator=g)
        colour = torch.rand(n, 3, 1, 1, generator=g)
        ellipse = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0
        rect = ((xx - cx).abs() < rx) & ((yy - cy).abs() < ry)
        use_rect = torch.rand(n, 1, 1, generator=g) < 0.5
        mask = torch.where(use_rect, rect, ellipse)[:, None].float()
        out = out * (1 - mask) + colour * mask
    return out


def random_backgrounds(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` varied backgrounds ``(n, size, size, 3)`` float32 in [0, 1], deterministic for the generator state.

    Each is a gradient, smooth noise or stripes, half of them with clutter shapes on top.
    """
    kinds = torch.randint(0, 3, (n,), generator=generator)
    out = torch.empty(n, 3, size, size)
    makers = (_gradient, _noise, _stripes)
    for k, make in enumerate(makers):
        idx = (kinds == k).nonzero().flatten()
        if len(idx):
            out[idx] = make(len(idx), size, generator)
    cluttered = (torch.rand(n, generator=generator) < 0.5).nonzero().flatten()
    if len(cluttered):
        out[cluttered] = _clutter(out[cluttered], generator)
    return out.permute(0, 2, 3, 1).contiguous().clamp(0, 1)


def composite(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Straight-alpha RGBA ``(..., H, W, 4)`` (the hand renderer's, images on disk) over ``background``
    ``(..., H, W, 3)`` -> RGB ``(..., H, W, 3)``."""
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + background * (1 - alpha)


def composite_premultiplied(rgba: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Premultiplied RGB + opacity ``(..., H, W, 4)`` (a NeRF's render) over ``background`` ``(..., H, W, 3)``
    -> RGB ``(..., H, W, 3)``: ``rgb + (1 - opacity) * background`` (not clamped)."""
    return rgba[..., :3] + (1 - rgba[..., 3:4]) * background


#: opacity (or alpha) above which a pixel counts as object for its box, for every image instsim makes
BOX_OPACITY = 0.5


def boxes_from_alpha(alpha: torch.Tensor, threshold: float = BOX_OPACITY) -> torch.Tensor:
    """Tight boxes around ``alpha > threshold``: ``alpha`` ``(B, H, W)`` -> ``(B, 4)`` COCO ``[x, y, w, h]`` in
    pixels (pixel edges, so a single covered pixel ``(u, v)`` gives ``[u, v, 1, 1]``). Empty masks give zeros."""
    mask = alpha > threshold
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    b, h, w = alpha.shape
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, big).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1).float()
    return torch.where(mask.flatten(1).any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))
