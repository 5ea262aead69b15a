"""From head outputs to boxes: 3x3 max-pool peak extraction, per-image top-k, score threshold and a
small class-wise greedy NMS (no torchvision needed), plus batched inference.

Detections are per image: ``boxes (n, 4)`` xywh pixels (left, top, width, height; pixel convention of
:mod:`instsim.cameras`), ``scores (n,)`` in ``[0, 1]`` sorted descending, ``labels (n,)`` 0-based classes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .model import DetectorOutput

__all__ = ["Detections", "box_iou", "nms", "decode", "decode_outputs", "predict", "as_float_images"]


class Detections(NamedTuple):
    """One image's detections: ``boxes (n, 4)`` xywh px, ``scores (n,)``, ``labels (n,)`` long (0-based)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xywh boxes ``a (n, 4)`` and ``b (m, 4)`` -> ``(n, m)``."""
    ax1, ay1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = (torch.minimum(ax1[:, None], bx1[None]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    ih = (torch.minimum(ay1[:, None], by1[None]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return inter / union.clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-wise greedy NMS: indices (into the inputs) of the kept boxes, by descending score.
    A box is dropped when it overlaps a kept, higher-scoring box of the same class with IoU > threshold."""
    order = torch.argsort(scores, descending=True, stable=True)
    if order.numel() <= 1 or iou_threshold >= 1:
        return order
    b, lab = boxes[order], labels[order]
    over = ((box_iou(b, b) > iou_threshold) & (lab[:, None] == lab[None])).tolist()
    n = len(over)
    removed = [False] * n
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        row = over[i]
        for j in range(i + 1, n):
            if row[j]:
                removed[j] = True
    return order[torch.tensor(keep, dtype=torch.long)]


def decode(
    scores: torch.Tensor,
    size: torch.Tensor,
    offset: torch.Tensor,
    stride: int,
    score_threshold: float = 0.05,
    max_detections: int = 20,
    nms_iou: float = 0.5,
    image_size: tuple[int, int] | None = None,
) -> list[Detections]:
    """Boxes from heatmap **scores** (already in ``[0, 1]``) and size/offset maps.

    Args:
        scores: ``(B, C, h, w)`` heatmap scores.
        size: ``(B, 2, h, w)`` log box size in cells.
        offset: ``(B, 2, h, w)`` centre offset in cells.
        stride: output stride in pixels.
        score_threshold: keep peaks with score ``>=`` this (and ``> 0``).
        max_detections: top-k peaks per image before thresholding/NMS.
        nms_iou: class-wise NMS IoU threshold (``>= 1`` disables NMS).
        image_size: ``(H, W)`` to clip the boxes to (default ``(h * stride, w * stride)``).

    Returns:
        a :class:`Detections` per image.
    """
    B, C, h, w = scores.shape
    H, W = image_size if image_size is not None else (h * stride, w * stride)
    scores, size, offset = scores.detach(), size.detach(), offset.detach()
    peaks = scores == F.max_pool2d(scores, 3, stride=1, padding=1)
    s = torch.where(peaks, scores, torch.zeros_like(scores)).reshape(B, -1)
    k = min(max_detections, s.shape[1])
    top_s, top_i = torch.topk(s, k, dim=1)
    cls = top_i // (h * w)
    cell = top_i % (h * w)
    ys, xs = (cell // w).to(scores.dtype), (cell % w).to(scores.dtype)
    sz = size.reshape(B, 2, h * w).gather(2, cell[:, None, :].expand(B, 2, k))
    off = offset.reshape(B, 2, h * w).gather(2, cell[:, None, :].expand(B, 2, k))
    max_log = math.log(4.0 * max(H, W) / stride)
    bw = torch.exp(sz[:, 0].clamp(-10.0, max_log)) * stride
    bh = torch.exp(sz[:, 1].clamp(-10.0, max_log)) * stride
    cx = (xs + off[:, 0]) * stride
    cy = (ys + off[:, 1]) * stride
    x0, y0 = (cx - bw / 2).clamp(0, W), (cy - bh / 2).clamp(0, H)
    x1, y1 = (cx + bw / 2).clamp(0, W), (cy + bh / 2).clamp(0, H)
    boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=2)  # (B, k, 4)

    out = []
    for b in range(B):
        keep = (top_s[b] >= score_threshold) & (top_s[b] > 0) & (boxes[b, :, 2] > 0) & (boxes[b, :, 3] > 0)
        bb, ss, ll = boxes[b][keep], top_s[b][keep], cls[b][keep]
        idx = nms(bb, ss, ll, nms_iou)
        out.append(Detections(bb[idx].float(), ss[idx].float(), ll[idx].long()))
    return out


def decode_outputs(outputs: DetectorOutput, stride: int, **kwargs) -> list[Detections]:
    """:func:`decode` applied to raw head outputs (sigmoid of the heatmap logits); ``kwargs`` as :func:`decode`."""
    return decode(torch.sigmoid(outputs.heatmap), outputs.size, outputs.offset, stride, **kwargs)


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` images as float32 in ``[0, 1]`` (uint8 is divided by 255)."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images if images.is_floating_point() else images.float()


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    nms_iou: float | None = None,
    progress: bool = False,
) -> list[Detections]:
    """Batched inference: a :class:`Detections` per image of ``images (N, 3, H, W)`` (float in ``[0, 1]``
    or uint8), run on the model's device and returned on the CPU. Decoding options default to the model's
    ``cfg``. The model's train/eval mode is restored."""
    cfg = model.cfg
    st = cfg.score_threshold if score_threshold is None else score_threshold
    md = cfg.max_detections if max_detections is None else max_detections
    ni = cfg.nms_iou if nms_iou is None else nms_iou
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    dtype, device = p.dtype, p.device
    out: list[Detections] = []
    try:
        starts = range(0, len(images), batch_size)
        if progress:
            starts = tqdm(starts, desc="detect", unit="batch")
        for i in starts:
            x = as_float_images(images[i:i + batch_size]).to(device=device, dtype=dtype)
            dets = decode_outputs(model(x), cfg.stride, score_threshold=st, max_detections=md, nms_iou=ni,
                                  image_size=tuple(x.shape[2:]))
            out += [Detections(*(t.cpu() for t in d)) for d in dets]
    finally:
        model.train(was_training)
    return out
