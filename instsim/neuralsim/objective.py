"""The detector's side of Neural-Sim's bilevel problem: the validation set that steers psi, ``L_val`` and its
gradient ``v = dL_val/dtheta``, the validation AP, and the detector targets of a set of boxes.

The training loss is one function in one mode throughout (:func:`instsim.detect.detection_loss`, mean over
images, no augmentation; the detector has GroupNorm only, so train/eval mode do not differ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from ..detect import DetectionTargets, DetectorConfig, detection_loss, encode_targets, evaluate_coco, make_coco_gt, predict

__all__ = ["ValSet", "all_finite", "detector_targets", "flat_norm", "float_images", "val_ap", "val_loss_and_grad"]


class ValSet(NamedTuple):
    """The validation (target/val) set: ``images (N, 3, H, W)`` float in [0, 1] (or uint8), per image boxes
    ``(n_i, 4)`` xywh pixels and labels ``(n_i,)`` 0-based (sorted class names), and optionally its COCO
    ground truth dict for the AP (built from the boxes when absent)."""

    images: torch.Tensor
    boxes: Sequence[torch.Tensor]
    labels: Sequence[torch.Tensor]
    coco: Mapping | None = None


def detector_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], images: torch.Tensor,
                     cfg: DetectorConfig, dtype: torch.dtype) -> DetectionTargets:
    """The detector's training targets of ``boxes``/``labels`` for ``images (N, 3, H, W)`` (see
    :func:`instsim.detect.encode_targets`)."""
    return encode_targets(boxes, labels, tuple(images.shape[2:]), cfg.num_classes, cfg.stride, cfg.min_overlap, dtype=dtype)


def float_images(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``[0, 255]`` or float ``[0, 1]`` images as float ``dtype`` in [0, 1]."""
    images = torch.as_tensor(images)
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return x.to(dtype)


def val_loss_and_grad(model: torch.nn.Module, params: tuple[torch.Tensor, ...], val: ValSet,
                      val_targets: DetectionTargets, batch: int = 64) -> tuple[float, tuple[torch.Tensor, ...]]:
    """``L_val`` (mean over the val images) and ``v = dL_val/dtheta``, accumulated over batches."""
    n = len(val.images)
    dtype, device = params[0].dtype, params[0].device
    total = torch.zeros((), dtype=torch.float64)
    grads = [torch.zeros_like(p) for p in params]
    for s in range(0, n, batch):
        x = float_images(val.images[s:s + batch], dtype).to(device)
        t = val_targets.index(slice(s, s + batch)).to(device)
        loss = detection_loss(model, x, t, reduction="sum") / n
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc += g
        total += float(loss.detach())
    return float(total), tuple(grads)


def val_ap(model: torch.nn.Module, val: ValSet, class_names: Sequence[str]) -> float:
    """COCO AP of ``model`` on ``val``."""
    coco = val.coco
    if coco is None:
        coco = make_coco_gt(val.boxes, val.labels, tuple(val.images.shape[2:]), list(class_names))
    dets = predict(model, val.images)
    return float(evaluate_coco(coco, dets)["AP"])


def flat_norm(vec: Sequence[torch.Tensor]) -> float:
    """Euclidean norm of a vector given as a sequence of tensors."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in vec)))


def all_finite(vec: Sequence[torch.Tensor]) -> bool:
    """Every element of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in vec)
