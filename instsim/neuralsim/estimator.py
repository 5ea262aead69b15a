"""Estimators of Neural-Sim's hypergradient ``dL_val/dpsi`` from a fine-tuned detector and its training images.

The training loss is the mean over the ``n`` rendered images, ``L_train = (1/n) sum_i l(theta; x_i, b_i)``: image
``x_i`` *and* its box ``b_i`` come from a pose drawn from ``p_psi``. With ``u = H^-1 dL_val/dtheta``
(:func:`~instsim.neuralsim.implicit.inverse_hvp`) the implicit-function theorem gives
``dL_val/dpsi = -d/dpsi [(dL_train/dtheta) . u]`` (u held fixed). How the sample moves with psi decides the
estimator (:data:`ESTIMATORS`, config ``neuralsim.estimator``):

* ``pathwise`` -- reparameterized (relaxed, stored-noise) poses, differentiated through the renderer *and* the
  labels::

      dL_val/dpsi = sum_i g_x,i . dx_i/dpsi + g_b,i . db_i/dpsi,
      (g_x,i, g_b,i) = -d/d(x_i, b_i) [(dL_train/dtheta) . u]     (:func:`pathwise_input_grads`)

  ``db_i/dpsi`` comes from the re-rendered opacity (:func:`~instsim.scene.backgrounds.soft_boxes`) and ``dl/db``
  from size/offset targets that are tensor functions of the box
  (:func:`~instsim.detect.targets.with_box_gradient`). Needs a pose gradient of the renderer.
* ``pathwise_fixed_box`` -- the same without the ``g_b`` term: the boxes held at the no-grad render's while the
  image moves (Neural-Sim's, and this loop's before issue #15). Biased where the loss is smooth in the box: as zoom
  moves the camera closer the true box grows but the label does not. With L1 size/offset losses (this detector's)
  ``d^2 l / (dtheta db)`` is 0 almost everywhere, so there the two pathwise estimators agree.
* ``score_function`` -- the hard samples' bins ``k_i ~ p_psi`` (Gumbel-max), ``E_psi[f] = sum_k p_psi(k) f(k)``::

      dL_val/dpsi = (1/n) sum_i (I_i - c_i) d/dpsi log p_psi(k_i),   I_i = -(dl_i/dtheta) . u

  with ``I_i`` the influence of image ``i`` (:func:`~instsim.neuralsim.implicit.influences`) and ``c_i`` a
  baseline that does not depend on sample ``i`` (:data:`BASELINES`; ``leave_one_out``: the mean influence of the
  class's other samples), which keeps the estimate unbiased since ``E[d log p] = 0``. Unbiased for categorical
  bins; needs no render gradient and no box gradient (the jitter inside a bin does not depend on psi).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from .implicit import Params, implicit_input_grads

__all__ = ["ESTIMATORS", "BASELINES", "pathwise_input_grads", "leave_one_out_baseline", "per_factor_baseline",
           "score_function_surrogate"]

#: the hypergradient estimators (module docstring); one definition, checked against the config schema's enum
ESTIMATORS: tuple[str, ...] = ("pathwise", "pathwise_fixed_box", "score_function")

#: control variates of the score-function estimator (:func:`score_function_surrogate`)
BASELINES: tuple[str, ...] = ("leave_one_out", "per_factor", "none")


def pathwise_input_grads(
    train_loss_fn: Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor],
    params: Params,
    images: torch.Tensor,
    boxes: torch.Tensor,
    u: Params,
    box_term: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(g_x, g_b)`` of the pathwise estimator: ``-d/d(x, b) [(dL_train/dtheta) . u]``, minus sign applied.

    Args:
        train_loss_fn: ``(params, images, boxes) -> scalar`` the training loss, differentiable in the boxes
            (for the detector: its loss on ``with_box_gradient(targets, boxes)``).
        images: ``(n, 3, H, W)`` the rendered training images; ``boxes``: ``(n, 4)`` xywh pixels, theirs.
        box_term: False is ``pathwise_fixed_box``: ``g_b`` is None and the boxes are held fixed.

    Returns:
        ``g_x (n, 3, H, W)`` and ``g_b (n, 4)`` (or None): backpropagate them through the re-rendered images and
        the re-rendered boxes (:func:`~instsim.scene.backgrounds.soft_boxes`) to psi.
    """
    if box_term:
        gx, gb = implicit_input_grads(train_loss_fn, params, (images, boxes), u)
        return gx, gb
    fixed = boxes.detach()
    (gx,) = implicit_input_grads(lambda p, x: train_loss_fn(p, x, fixed), params, (images,), u)
    return gx, None


def leave_one_out_baseline(values: torch.Tensor) -> torch.Tensor:
    """``(n,)`` -> ``(n,)``: for each entry the mean of the others (0 when ``n == 1``). Independent of the entry
    itself, so subtracting it from a score-function estimate keeps it unbiased."""
    n = values.numel()
    if n <= 1:
        return torch.zeros_like(values)
    return (values.sum() - values) / (n - 1)


def per_factor_baseline(values: torch.Tensor, bins: Mapping[str, torch.Tensor], factor: str) -> torch.Tensor:
    """``(n,)`` -> ``(n,)``: the baseline of sample ``i`` for ``factor``'s score term: the others' mean plus, for
    every *other* factor ``g``, the main effect of sample ``i``'s bin of ``g`` (mean of the other samples in that
    bin minus the others' mean; 0 when no other sample is in it).

    It uses neither ``values[i]`` nor sample ``i``'s bin of ``factor``, and the factors are drawn independently,
    so subtracting it keeps ``factor``'s score-function term unbiased; it removes the part of ``I_i`` that the
    other factors explain (e.g. the azimuth's, when learning elevation), which the plain leave-one-out baseline
    leaves in as noise.

    Args:
        values: ``(n,)`` the samples' influences; bins: ``{factor: (n,)}`` their bins (every factor drawn).
    """
    n = values.numel()
    if n <= 1:
        return torch.zeros_like(values)
    values = values.detach()
    loo_mean = (values.sum() - values) / (n - 1)
    c = loo_mean.clone()
    for g, k in bins.items():
        if g == factor:
            continue
        k = k.to(values.device).long()
        same = (k[:, None] == k[None, :]).to(values.dtype)
        same.fill_diagonal_(0.0)  # the other samples in sample i's bin of g
        count = same.sum(1)
        mean_in_bin = (same @ values) / count.clamp_min(1.0)
        c = c + torch.where(count > 0, mean_in_bin - loo_mean, torch.zeros_like(c))
    return c


def score_function_surrogate(
    log_probs: Mapping[str, torch.Tensor],
    bins: Mapping[str, torch.Tensor],
    influence: torch.Tensor,
    n_total: int,
    baseline: str = "leave_one_out",
    factors: Sequence[str] | None = None,
) -> torch.Tensor:
    """A scalar whose gradient with respect to psi is the score-function estimate of one class's share of
    ``dL_val/dpsi``: ``(1/n_total) sum_i (I_i - c_i) sum_f log p_f(k_i,f)``.

    Args:
        log_probs: ``{factor: (bins,)}`` normalized log-probabilities of the class (``PoseDistribution.log_probs``),
            differentiable for the learned factors.
        bins: ``{factor: (n_c,)}`` the bins of the class's ``n_c`` hard samples (``hard_bins``; every factor, for
            ``per_factor``).
        influence: ``(n_c,)`` ``I_i`` of those samples (:func:`~instsim.neuralsim.implicit.influences`), detached.
        n_total: images in the training loss's mean (every class's): the estimate's ``1/n``.
        baseline: one of :data:`BASELINES`: ``leave_one_out`` (the mean influence of the class's other samples),
            ``per_factor`` (:func:`per_factor_baseline`, for each factor's term) or ``none``.
        factors: the factors whose log-probability enters (default every factor in ``log_probs``; fixed factors
            contribute no gradient anyway).

    Returns:
        scalar; call ``.backward()`` (or ``torch.autograd.grad``) to accumulate the estimate in psi's ``.grad``.
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {list(BASELINES)}")
    if n_total < 1:
        raise ValueError(f"n_total must be >= 1, got {n_total}")
    influence = influence.detach()
    names = list(factors) if factors is not None else list(log_probs)
    total = None
    for f in names:
        lp = log_probs[f]
        k = bins[f].to(lp.device).long()
        if k.shape != influence.shape:
            raise ValueError(f"bins[{f!r}] has shape {tuple(k.shape)}, the influences {tuple(influence.shape)}")
        if baseline == "per_factor":
            c = per_factor_baseline(influence, bins, f)
        elif baseline == "leave_one_out":
            c = leave_one_out_baseline(influence)
        else:
            c = torch.zeros_like(influence)
        weight = (influence - c) / float(n_total)
        term = (weight.to(device=lp.device, dtype=lp.dtype) * lp[k]).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no factor to differentiate")
    return total
