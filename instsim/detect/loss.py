"""The detector's training loss: penalty-reduced focal loss on the centre heatmaps plus L1 on log-size
and centre offset at the object centres (CenterNet), defined **per image** and twice differentiable.

Per image ``b`` with ``P_b`` heatmap peaks (cells where the target is exactly 1) and ``M_b`` supervised
centre cells::

    focal_b  = -1/max(P_b,1) * sum_{c,y,x} [ t==1 ] (1-p)^a log p + [ t<1 ] (1-t)^b p^a log(1-p)
    size_b   = 1/max(M_b,1) * mean over (w,h) of sum |size_pred - size_t| over centre cells
    offset_b = the same for the offset
    L_b      = focal_b + size_weight * size_b + offset_weight * offset_b

and the batch loss is ``mean_b L_b`` (``reduction="mean"``), ``sum_b L_b`` or the vector ``(L_b)``
(``reduction="none"``). Normalising each image by its own object count keeps images independent: with
the per-image layers of :mod:`.model` (GroupNorm, no BatchNorm), ``L_b`` depends on image ``b`` only.

Differentiability: ``log p = logsigmoid(z)`` and ``log(1 - p) = logsigmoid(-z)`` (no clamps, no
in-place ops on graph tensors), so ``torch.autograd.grad(..., create_graph=True)`` followed by a second
``grad`` w.r.t. the images works; the targets are constants.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import DetectorConfig
from .model import DetectorOutput
from .targets import DetectionTargets

__all__ = ["focal_loss", "regression_loss", "loss_terms", "compute_loss", "detection_loss"]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """Penalty-reduced focal loss per image, normalised by the image's peak count.

    Args:
        logits: ``(B, C, h, w)`` heatmap logits.
        target: ``(B, C, h, w)`` Gaussian heatmap targets, exactly 1 at object centres.

    Returns:
        ``(B,)`` losses.
    """
    pos = (target == 1).to(logits.dtype)
    neg = 1.0 - pos
    p = torch.sigmoid(logits)
    pos_term = (1.0 - p).pow(alpha) * F.logsigmoid(logits) * pos
    neg_term = (1.0 - target).pow(beta) * p.pow(alpha) * F.logsigmoid(-logits) * neg
    num_pos = pos.sum(dim=(1, 2, 3)).clamp(min=1.0)
    return -(pos_term + neg_term).sum(dim=(1, 2, 3)) / num_pos


def regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked L1 per image: ``(B, 2, h, w)`` prediction/target, ``(B, 1, h, w)`` mask -> ``(B,)`` mean
    absolute error per coordinate over the masked cells (0 for an image without objects)."""
    err = (pred - target).abs() * mask
    n = mask.sum(dim=(1, 2, 3)).clamp(min=1.0) * pred.shape[1]
    return err.sum(dim=(1, 2, 3)) / n


def loss_terms(outputs: DetectorOutput, targets: DetectionTargets, cfg: DetectorConfig) -> dict[str, torch.Tensor]:
    """The per-image loss terms ``{"heatmap", "size", "offset", "total"}``, each ``(B,)``."""
    if outputs.heatmap.shape != targets.heatmap.shape:
        raise ValueError(f"heatmap output {tuple(outputs.heatmap.shape)} and target {tuple(targets.heatmap.shape)} differ "
                         "(wrong image size, stride or num_classes?)")
    t = targets if targets.heatmap.dtype == outputs.heatmap.dtype else targets.to(outputs.heatmap.dtype)
    hm = focal_loss(outputs.heatmap, t.heatmap, cfg.focal_alpha, cfg.focal_beta)
    sz = regression_loss(outputs.size, t.size, t.mask)
    off = regression_loss(outputs.offset, t.offset, t.mask)
    return {"heatmap": hm, "size": sz, "offset": off, "total": hm + cfg.size_weight * sz + cfg.offset_weight * off}


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def compute_loss(outputs: DetectorOutput, targets: DetectionTargets, cfg: DetectorConfig,
                 reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """Loss from head outputs: ``(loss, parts)`` where ``parts`` holds detached batch-mean floats of each
    term (for logging)."""
    terms = loss_terms(outputs, targets, cfg)
    parts = {k: float(v.detach().mean()) for k, v in terms.items()}
    return _reduce(terms["total"], reduction), parts


def detection_loss(
    model: nn.Module,
    images: torch.Tensor,
    targets: DetectionTargets,
    params: Mapping[str, torch.Tensor] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The training loss of ``model`` on ``images`` with pre-encoded ``targets``.

    Twice differentiable w.r.t. ``images`` and the parameters, e.g. for Neural-Sim::

        g = torch.autograd.grad(detection_loss(model, x, t), params, create_graph=True)
        h = torch.autograd.grad(sum((gi * ui).sum() for gi, ui in zip(g, u)), x)  # d/dx (dL/dθ · u)

    Args:
        model: a :class:`~instsim.detect.model.CenterNet` (its ``cfg`` gives the loss weights).
        images: ``(B, 3, H, W)`` float in ``[0, 1]``.
        targets: from :func:`~instsim.detect.targets.encode_targets` for the same images (outside the graph).
        params: optional ``{name: tensor}`` replacing the model's parameters (``torch.func.functional_call``),
            for functional inner loops; missing names keep the module's own tensors.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (the ``(B,)`` per-image losses).

    Returns:
        scalar loss (or ``(B,)`` with ``reduction="none"``).
    """
    if params is None:
        outputs = model(images)
    else:
        outputs = torch.func.functional_call(model, dict(params), (images,), strict=False)
    return _reduce(loss_terms(DetectorOutput(*outputs), targets, model.cfg)["total"], reduction)
