"""Boxes of rendered objects that carry a gradient with respect to the camera pose.

A training image's box is ``boxes_from_alpha(opacity, 0.5)`` (:mod:`instsim.scene.backgrounds`): whole pixels,
a piecewise-constant function of the pose, so its derivative is zero almost everywhere, although the box moves
with the pose (most with zoom). :func:`soft_boxes` gives each edge the sub-pixel position where the rendered
opacity crosses the threshold, interpolated linearly between the two pixel centres around the crossing::

    a(u)  = max over rows of opacity(row, u)            the column profile; (n, W)
    i     = first column with a(i) > t                  (boxes_from_alpha's left edge)
    x0    = (i - 0.5) + (t - a(i-1)) / (a(i) - a(i-1))  the crossing, pixel units

and likewise for the right edge (last column, the crossing toward ``i+1``) and the rows. ``max`` passes the
gradient to the row that attains it, the profile's outermost pixel: by Danskin's theorem the derivative of a max
is the derivative at its argmax, so the crossing moves as the silhouette's extreme point does. The opacity comes
from a render with gradient (to the pose), so the edges do too.

With ``straight_through=True`` (the loop's) the forward value is exactly ``boxes_from_alpha``'s integer box and
only the gradient is the crossing's, so the detector is trained on the same boxes as without the box term; with
``False`` the forward value is the crossing itself, a smooth function of the pose (for finite-difference checks).
An edge on the image border (no pixel outside to interpolate with) gets no gradient: the box is clipped there.
"""

from __future__ import annotations

import torch

__all__ = ["soft_boxes", "MIN_STEP"]

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


def soft_boxes(opacity: torch.Tensor, threshold: float = 0.5, straight_through: bool = True) -> torch.Tensor:
    """Boxes ``(n, 4)`` COCO xywh pixels around ``opacity > threshold``, differentiable through ``opacity``.

    Args:
        opacity: ``(n, H, W)`` rendered opacity in [0, 1], typically requiring grad.
        threshold: as :func:`~instsim.scene.backgrounds.boxes_from_alpha`'s.
        straight_through: forward the integer box of ``boxes_from_alpha`` (gradient of the crossing), or forward
            the sub-pixel crossing itself (module docstring).

    Returns:
        ``(n, 4)`` in ``opacity``'s dtype; an image with nothing above the threshold gets a zero box without gradient.
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
