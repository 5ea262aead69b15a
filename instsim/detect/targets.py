"""Dense training targets at the output stride from per-image boxes (CenterNet encoding).

Boxes are ``xywh`` in pixels (COCO order: left, top, width, height; pixel convention of
:mod:`instsim.cameras`: the top-left pixel covers ``[0, 1) x [0, 1)``). Labels are 0-based class indices.

For an object with (clipped) box centre ``(cx, cy)`` pixels and size ``(bw, bh)`` pixels at stride ``s``:

* its centre cell is ``(i, j) = (floor(cx / s), floor(cy / s))`` (clamped into the grid);
* ``heatmap[c]`` gets a Gaussian peaked at exactly ``1`` on that cell, with the CenterNet radius rule
  (:func:`gaussian_radius` of the box size in cells, ``sigma = (2 r + 1) / 6``), overlapping Gaussians
  combined by max;
* ``size[:, j, i] = log(bw / s), log(bh / s)`` and ``offset[:, j, i] = cx / s - i, cy / s - j``;
* ``mask[0, j, i] = 1`` (where size/offset are supervised). When two objects share a centre cell the
  smaller box wins the regression targets (both keep their heatmap peak when of different classes).

Encoding runs once, outside any autograd graph. :func:`with_box_gradient` then makes the size and offset
targets of a one-object-per-image batch tensor functions of boxes that carry a gradient (e.g. with respect to the
camera pose that rendered them); the heatmap target stays constant: it changes only when the centre cell or the
integer Gaussian radius jumps, so its derivative is zero almost everywhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

__all__ = ["DetectionTargets", "gaussian_radius", "encode_targets", "clip_boxes", "with_box_gradient"]


class DetectionTargets(NamedTuple):
    """Dense targets for a batch at the output stride ``(h, w) = (H/s, W/s)``.

    heatmap: ``(B, C, h, w)`` in ``[0, 1]``, exactly ``1`` at object centres.
    size: ``(B, 2, h, w)`` log box (width, height) in cells, valid where ``mask``.
    offset: ``(B, 2, h, w)`` centre offset (x, y) in cells in ``[0, 1)``, valid where ``mask``.
    mask: ``(B, 1, h, w)`` float, 1 at the centre cells that carry size/offset targets.
    num_objects: ``(B,)`` float, number of encoded objects per image.
    """

    heatmap: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor
    mask: torch.Tensor
    num_objects: torch.Tensor

    def to(self, *args, **kwargs) -> "DetectionTargets":
        """All tensors moved/cast like ``Tensor.to`` (e.g. ``targets.to(torch.float64)``)."""
        return DetectionTargets(*(t.to(*args, **kwargs) for t in self))

    def index(self, idx: torch.Tensor | slice) -> "DetectionTargets":
        """The targets of a subset of the batch (``idx`` indexes dim 0)."""
        return DetectionTargets(*(t[idx] for t in self))


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float = 0.7) -> torch.Tensor:
    """CenterNet's Gaussian radius rule (as in the reference implementation): the radius (same units as
    the box size) a corner may move while the box keeps IoU >= ``min_overlap``, min over three cases."""
    h, w = height.to(torch.float64), width.to(torch.float64)
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(n, 4)`` xywh boxes clipped to the image ``[0, width] x [0, height]`` (width/height may become 0)."""
    x0 = boxes[:, 0].clamp(0, width)
    y0 = boxes[:, 1].clamp(0, height)
    x1 = (boxes[:, 0] + boxes[:, 2]).clamp(0, width)
    y1 = (boxes[:, 1] + boxes[:, 3]).clamp(0, height)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)


def _as_boxes(b, i: int) -> torch.Tensor:
    t = torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4) if len(b) else torch.zeros(0, 4, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"boxes[{i}] has non-finite values")
    if (t[:, 2:] <= 0).any():
        raise ValueError(f"boxes[{i}] has a box with width or height <= 0 (boxes are xywh pixels)")
    return t


def encode_targets(
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    image_size: int | tuple[int, int],
    num_classes: int,
    stride: int = 4,
    min_overlap: float = 0.7,
    min_box_size: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> DetectionTargets:
    """Dense CenterNet targets for a batch of ``B = len(boxes)`` images.

    Args:
        boxes: per image an ``(n_i, 4)`` tensor (or array / list) of xywh pixel boxes.
        labels: per image an ``(n_i,)`` tensor of 0-based class indices in ``[0, num_classes)``.
        image_size: ``S`` or ``(H, W)`` pixels; must be divisible by ``stride``.
        num_classes: ``C``.
        stride: output stride in pixels.
        min_overlap: CenterNet radius rule parameter.
        min_box_size: boxes narrower or lower than this many pixels after clipping to the image are
            ignored (objects outside the image).
        dtype: floating dtype of the returned tensors.

    Returns:
        :class:`DetectionTargets` (see its docstring for shapes and units).
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if H % stride or W % stride:
        raise ValueError(f"image size {(H, W)} must be divisible by the stride {stride}")
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} box lists but {len(labels)} label lists")
    B, C, h, w = len(boxes), num_classes, H // stride, W // stride
    heat = torch.zeros(B * C, h, w, dtype=torch.float64)
    size = torch.zeros(B, 2, h, w, dtype=torch.float64)
    offset = torch.zeros(B, 2, h, w, dtype=torch.float64)
    mask = torch.zeros(B, 1, h, w, dtype=torch.float64)
    counts = torch.zeros(B, dtype=torch.float64)

    all_b, all_c, all_box = [], [], []
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        bx = _as_boxes(bx, i)
        lb = torch.as_tensor(lb, dtype=torch.long).reshape(-1)
        if lb.numel() != bx.shape[0]:
            raise ValueError(f"boxes[{i}] has {bx.shape[0]} boxes but labels[{i}] has {lb.numel()} labels")
        if lb.numel() and (lb.min() < 0 or lb.max() >= C):
            raise ValueError(f"labels[{i}] must be 0-based class indices in [0, {C}), got {lb.tolist()}")
        bx = clip_boxes(bx, H, W)
        keep = (bx[:, 2] >= min_box_size) & (bx[:, 3] >= min_box_size)
        all_b.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
        all_c.append(lb[keep])
        all_box.append(bx[keep])
    if not all_b or sum(len(b) for b in all_b) == 0:
        return DetectionTargets(heat.view(B, C, h, w).to(dtype), size.to(dtype), offset.to(dtype), mask.to(dtype), counts.to(dtype))
    bi, ci, bx = torch.cat(all_b), torch.cat(all_c), torch.cat(all_box)

    cx = (bx[:, 0] + 0.5 * bx[:, 2]) / stride  # centre in cells
    cy = (bx[:, 1] + 0.5 * bx[:, 3]) / stride
    gx = cx.floor().clamp(0, w - 1)
    gy = cy.floor().clamp(0, h - 1)
    bw, bh = bx[:, 2] / stride, bx[:, 3] / stride  # size in cells

    # Gaussians (n, h, w): CenterNet radius, truncated to the (2r+1)^2 window, peak exactly 1
    r = gaussian_radius(bh, bw, min_overlap).floor().clamp(min=0)
    sigma = (2 * r + 1) / 6
    dx = torch.arange(w, dtype=torch.float64)[None, :] - gx[:, None]  # (n, w)
    dy = torch.arange(h, dtype=torch.float64)[None, :] - gy[:, None]  # (n, h)
    g = torch.exp(-(dx[:, None, :] ** 2 + dy[:, :, None] ** 2) / (2 * sigma[:, None, None] ** 2))
    inside = (dx.abs()[:, None, :] <= r[:, None, None]) & (dy.abs()[:, :, None] <= r[:, None, None])
    g = torch.where(inside, g, torch.zeros_like(g))
    rows = (bi * C + ci)[:, None].expand(-1, h * w)
    heat.view(B * C, h * w).scatter_reduce_(0, rows, g.reshape(-1, h * w), "amax", include_self=True)

    # regression targets: larger boxes first so that the smaller box wins a shared centre cell
    order = torch.argsort(bx[:, 2] * bx[:, 3], descending=True, stable=True)
    gxi, gyi = gx.long(), gy.long()
    for k in order.tolist():
        b, x, y = int(bi[k]), int(gxi[k]), int(gyi[k])
        size[b, 0, y, x] = math.log(float(bw[k]))
        size[b, 1, y, x] = math.log(float(bh[k]))
        offset[b, 0, y, x] = float(cx[k] - gx[k])
        offset[b, 1, y, x] = float(cy[k] - gy[k])
        mask[b, 0, y, x] = 1.0
    counts.index_add_(0, bi, torch.ones_like(bi, dtype=torch.float64))
    return DetectionTargets(heat.view(B, C, h, w).to(dtype), size.to(dtype), offset.to(dtype), mask.to(dtype), counts.to(dtype))


def with_box_gradient(targets: DetectionTargets, boxes: torch.Tensor, stride: int = 4) -> DetectionTargets:
    """``targets`` with the size and offset targets of every image's centre cell replaced by tensor functions of
    ``boxes``, so that a loss on them is differentiable with respect to the boxes.

    The cells are those :func:`encode_targets` chose from the same boxes (detached): forward, the result equals
    ``targets``; backward, ``size = log(clipped w / stride), log(h / stride)`` and ``offset = clipped centre / stride
    - cell`` pass the gradient to ``boxes``. Images whose box was dropped (``mask`` all zero) keep their targets.

    Args:
        targets: from :func:`encode_targets` of ``boxes.detach()`` (one box per image), ``(B, ...)`` tensors.
        boxes: ``(B, 4)`` xywh pixels, one box per image, any float dtype, may require grad.
        stride: the encoding's output stride.

    Returns:
        :class:`DetectionTargets` in ``targets``' dtype; ``size`` and ``offset`` carry the gradient.
    """
    B, _, h, w = targets.mask.shape
    if boxes.ndim != 2 or boxes.shape != (B, 4):
        raise ValueError(f"boxes must be (B, 4) = ({B}, 4), one box per image, got {tuple(boxes.shape)}")
    if (targets.num_objects > 1).any():
        raise ValueError("with_box_gradient takes one object per image (the Neural-Sim training images)")
    dtype = targets.size.dtype
    bx = clip_boxes(boxes.to(dtype), h * stride, w * stride)
    cx = (bx[:, 0] + 0.5 * bx[:, 2]) / stride
    cy = (bx[:, 1] + 0.5 * bx[:, 3]) / stride
    gx = cx.detach().floor().clamp(0, w - 1)
    gy = cy.detach().floor().clamp(0, h - 1)
    # log of a box clipped to zero width would be -inf; such images have no mask cell and keep their targets
    tiny = torch.finfo(dtype).tiny
    size = torch.stack([torch.log(bx[:, 2].clamp_min(tiny)), torch.log(bx[:, 3].clamp_min(tiny))], 1) - math.log(stride)
    offset = torch.stack([cx - gx, cy - gy], 1)
    cell = torch.zeros(B, 1, h, w, dtype=dtype, device=targets.mask.device)
    cell[torch.arange(B), 0, gy.long(), gx.long()] = 1.0
    cell = cell * targets.mask  # only where encode_targets supervises
    new_size = targets.size * (1 - cell) + cell * size[:, :, None, None]
    new_offset = targets.offset * (1 - cell) + cell * offset[:, :, None, None]
    return DetectionTargets(targets.heatmap, new_size, new_offset, targets.mask, targets.num_objects)
