"""Procedural backgrounds for detection images, and compositing objects over them.

The target domain and the synthetic training sets draw backgrounds from the same *kind* of generator
(smooth colour gradients, low-frequency noise, stripes and clutter shapes) but from different seeds, so a
detector never sees a target background while training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BOX_OPACITY", "MIN_STEP", "random_backgrounds", "composite", "composite_premultiplied", "boxes_from_alpha",
           "soft_boxes"]


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


#: smallest opacity step between the two pixels around a crossing that the interpolation divides by: a
#: profile flatter than this (a nearly transparent, blurred edge) moves the crossing by at most 1/MIN_STEP pixels
#: per unit of opacity change instead of without bound
MIN_STEP = 1e-2


def _edges(profile: torch.Tensor, threshold: float) -> tuple[torch.Tensor, ...]:
    """Start/end edges of ``profile > threshold`` per row of ``(n, L)``: ``(first, last + 1, start, end, any)``, the
    integer edges and the sub-pixel crossings, each ``(n,)``, and whether the row has any pixel above the threshold."""
    n, length = profile.shape
    above = profile > threshold
    any_above = above.any(dim=1)
    ar = torch.arange(length, device=profile.device)
    first = torch.where(above, ar, length).amin(dim=1).clamp(max=length - 1)
    last = torch.where(above, ar, -1).amax(dim=1).clamp(min=0)
    rows = torch.arange(n, device=profile.device)
    a_first = profile[rows, first]
    a_before = profile[rows, (first - 1).clamp(min=0)]
    a_last = profile[rows, last]
    a_after = profile[rows, (last + 1).clamp(max=length - 1)]
    d0 = (a_first - a_before).clamp_min(MIN_STEP)
    d1 = (a_last - a_after).clamp_min(MIN_STEP)
    start = (first.to(profile.dtype) - 0.5) + (threshold - a_before) / d0
    end = (last.to(profile.dtype) + 0.5) + (a_last - threshold) / d1
    # no neighbour outside the image: the edge is the border, without gradient
    start = torch.where(first > 0, start, torch.zeros_like(start))
    end = torch.where(last < length - 1, end, torch.full_like(end, float(length)))
    return first.to(profile.dtype), (last + 1).to(profile.dtype), start, end, any_above


def soft_boxes(opacity: torch.Tensor, threshold: float = BOX_OPACITY, straight_through: bool = True) -> torch.Tensor:
    """Boxes ``(n, 4)`` COCO xywh pixels around ``opacity > threshold``, differentiable through ``opacity``.

    :func:`boxes_from_alpha`'s whole-pixel box is a piecewise-constant function of the camera pose (derivative
    zero almost everywhere) although the box moves with the pose, most with zoom. Here each edge is also given
    the sub-pixel position where the opacity crosses the threshold, interpolated linearly between the two pixel
    centres around the crossing::

        a(u) = max over rows of opacity(row, u)             the column profile, (n, W)
        i    = first column with a(i) > t                   boxes_from_alpha's left edge
        x0   = (i - 0.5) + (t - a(i-1)) / (a(i) - a(i-1))   the crossing, pixels

    and likewise for the right edge (toward ``i + 1``) and the rows. ``max`` passes the gradient to the row that
    attains it, the profile's outermost pixel (Danskin: the derivative of a max is the derivative at its argmax),
    so with opacity rendered with gradient the crossing moves as the silhouette's extreme point does. An edge on
    the image border (no pixel outside to interpolate with) gets no gradient: the box is clipped there.

    Args:
        opacity: ``(n, H, W)`` rendered opacity in [0, 1], typically requiring grad.
        threshold: as :func:`boxes_from_alpha`'s.
        straight_through: forward exactly :func:`boxes_from_alpha`'s integer box with the crossing's gradient
            (Neural-Sim's loop: the detector trains on the same boxes with and without the box term); False
            forwards the crossing itself, a smooth function of the pose (for finite-difference checks).

    Returns:
        ``(n, 4)`` in ``opacity``'s dtype and device; an image with nothing above the threshold gets a zero box
        without gradient.
    """
    if opacity.ndim != 3:
        raise ValueError(f"opacity must be (n, H, W), got shape {tuple(opacity.shape)}")
    cols = opacity.amax(dim=1)  # (n, W)
    rows = opacity.amax(dim=2)  # (n, H)
    x0i, x1i, x0, x1, seen = _edges(cols, threshold)
    y0i, y1i, y0, y1, _ = _edges(rows, threshold)
    if straight_through:
        x0, x1 = x0i + (x0 - x0.detach()), x1i + (x1 - x1.detach())
        y0, y1 = y0i + (y0 - y0.detach()), y1i + (y1 - y1.detach())
    boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)
    return torch.where(seen[:, None], boxes, torch.zeros_like(boxes))
