"""Steps 4-6 of a Neural-Sim iteration: from the fine-tuned detector and ``v = dL_val/dtheta`` to ``dL_val/dpsi``.

``u ~ H^-1 v`` (:func:`inverse_hvp_of_training_loss`, with the curvature guard of
:func:`~instsim.neuralsim.implicit.inverse_hvp`), then one of the estimators of :mod:`instsim.neuralsim.estimator`
(:func:`hypergradient`), which leaves ``dL_val/dpsi`` in the distribution's ``.grad``:

* ``pathwise`` / ``pathwise_fixed_box``: the image gradient and (``pathwise``) the box gradient of
  ``-(dL_train/dtheta) . u`` (the box gradient through the size/offset targets,
  :func:`~instsim.detect.targets.with_box_gradient`), backpropagated through a re-render of the same samples with
  gradient to psi (:func:`~instsim.neuralsim.samples.backprop_image_grad`; boxes by
  :func:`~instsim.scene.backgrounds.soft_boxes`);
* ``score_function``: each image's influence ``I_i = -(dl_i/dtheta) . u``
  (:func:`~instsim.neuralsim.implicit.influences`) times the gradient of the log-probability of its sample's bins,
  with the leave-one-out baseline per class; no re-render.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from ..detect import DetectorConfig, detection_loss
from ..detect.targets import with_box_gradient
from ..errors import InstsimError
from .config import InverseHVPConfig, NeuralSimConfig
from .distribution import PoseDistribution
from .estimator import pathwise_input_grads, score_function_surrogate
from .implicit import influences, inverse_hvp, make_hvp
from .objective import all_finite, detector_targets, flat_norm
from .samples import ClassRenderers, ClassSamples, TrainingSet, backprop_image_grad
from .sampling import hard_bins

__all__ = ["NeuralSimError", "hypergradient", "inverse_hvp_of_training_loss"]


class NeuralSimError(InstsimError):
    """The outer loop produced a non-finite value (the last good checkpoint is kept)."""


def inverse_hvp_of_training_loss(detector: torch.nn.Module, params: tuple[torch.Tensor, ...], images: torch.Tensor,
                                 targets, v: tuple[torch.Tensor, ...], ih: InverseHVPConfig,
                                 info: dict[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
    """``u ~ (H + damping I)^-1 v`` with ``H`` the Hessian of the detector's training loss (mean over ``images``
    with their ``targets``) at its current parameters; ``info`` receives what the inverse used (its ``lambda_max``
    estimate and step for guarded Neumann)."""
    return inverse_hvp(make_hvp(lambda p: detection_loss(detector, images, targets), params), v, ih.method, ih.k,
                       ih.alpha, ih.damping, power_iters=ih.power_iters if ih.method == "neumann" else 0, info=info)


def hypergradient(
    iteration: int,
    renders: ClassRenderers,
    dist: PoseDistribution,
    detector: torch.nn.Module,
    detector_cfg: DetectorConfig,
    cfg: NeuralSimConfig,
    samples: Mapping[str, ClassSamples],
    train: TrainingSet,
    params: tuple[torch.Tensor, ...],
    v: tuple[torch.Tensor, ...],
    estimator: str | None = None,
    u: tuple[torch.Tensor, ...] | None = None,
) -> dict[str, Any]:
    """``dL_val/dpsi`` of the training set ``train`` (rendered from ``samples`` at the current ``dist``) into
    ``dist``'s ``.grad`` (zeroed first), by ``estimator`` (default ``cfg.estimator``).

    Args:
        detector: fine-tuned on ``train``; ``params`` its trainable parameters; ``v = dL_val/dtheta``.
        u: a precomputed ``~H^-1 v`` (e.g. to compare estimators on the same one); default computed here.

    Returns:
        ``{"u": u, "u_norm", "grad_norm" (before any clipping), "inverse": what the inverse used,
        "estimator", "seconds"}``.

    Raises:
        NeuralSimError: a non-finite inverse-HVP, image or box gradient, influence or psi gradient.
    """
    estimator = estimator or cfg.estimator
    t0 = time.perf_counter()
    x = train.images.to(device=params[0].device, dtype=params[0].dtype)
    targets = detector_targets(train.boxes, train.labels, x, detector_cfg, x.dtype).to(x.device)
    info: dict[str, Any] = {}
    ih = cfg.inverse_hvp
    if u is None:
        u = inverse_hvp_of_training_loss(detector, params, x, targets, v, ih, info)
    if not all_finite(u):
        raise NeuralSimError(f"Neural-Sim iteration {iteration}: the inverse-HVP is not finite ({info}); lower "
                             f"inverse_hvp.alpha or raise inverse_hvp.power_iters or damping")
    for p in dist.parameters():
        p.grad = torch.zeros_like(p)
    if estimator == "score_function":
        infl = influences(lambda p: detection_loss(detector, x, targets, reduction="none"), params, u).cpu()
        if not bool(torch.isfinite(infl).all()):
            raise NeuralSimError(f"Neural-Sim iteration {iteration}: an image influence is not finite")
        surrogate, start = None, 0
        for c in dist.classes:
            idx = train.index[c]
            if len(idx):
                bins = hard_bins(dist.logits(c), samples[c].noise[idx])  # the bins the rendered poses lie in
                term = score_function_surrogate(dist.log_probs(c), bins, infl[start:start + len(idx)], len(x),
                                                baseline=cfg.baseline, factors=dist.learned)
                surrogate = term if surrogate is None else surrogate + term
            start += len(idx)
        if surrogate is not None and surrogate.requires_grad:
            surrogate.backward()
    elif estimator in ("pathwise", "pathwise_fixed_box"):
        boxes = torch.cat(train.boxes).to(device=x.device, dtype=x.dtype)
        stride = detector_cfg.stride

        def train_loss(_params, images, bx):
            return detection_loss(detector, images, with_box_gradient(targets, bx, stride))

        gx, gb = pathwise_input_grads(train_loss, params, x, boxes, u, box_term=estimator == "pathwise")
        if not bool(torch.isfinite(gx).all()) or (gb is not None and not bool(torch.isfinite(gb).all())):
            raise NeuralSimError(f"Neural-Sim iteration {iteration}: the image or box gradient is not finite")
        backprop_image_grad(renders, dist, samples, train, gx, cfg.temperature, cfg.relaxation, cfg.render_chunk,
                            box_grad=gb)
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    ps = [p for p in dist.parameters() if p.grad is not None]
    grad_norm = flat_norm([p.grad for p in ps]) if ps else 0.0
    if not all_finite([p.grad for p in ps]):
        raise NeuralSimError(f"Neural-Sim iteration {iteration}: dL_val/dpsi is not finite ({estimator})")
    return {"u": u, "u_norm": flat_norm(u), "grad_norm": grad_norm, "inverse": info, "estimator": estimator,
            "seconds": time.perf_counter() - t0}
