"""One outer iteration of Neural-Sim (:func:`outer_step`), for the current psi and detector theta:

1. per class, draw K relaxed pose samples (stored Gumbel noise and jitter), principal-point shifts and
   backgrounds, and render them **without gradient** (:func:`~instsim.neuralsim.samples.render_training_set`):
   the NeRF's premultiplied rgb over the background, boxes from the opacity (held fixed from here on);
2. fine-tune theta on those images (``inner_steps`` AdamW steps, no augmentation) from the previous theta,
   or with ``reset_detector`` from the warm-started theta (the loop restores it before the step);
3. ``v = dL_val/dtheta`` on ``target/val``;
4. ``u ~ H^-1 v`` with ``H`` the Hessian of the training loss on the rendered images (identity / Neumann with
   its power-iteration curvature guard / CG, :func:`~instsim.neuralsim.implicit.inverse_hvp`);
5-6. ``dL_val/dpsi`` by ``cfg.estimator`` (:mod:`instsim.neuralsim.hypergradient`): ``pathwise`` backpropagates
   ``-d/d(x, b)[(dL_train/dtheta) . u]`` (**minus sign of the implicit-function theorem included**) through a
   re-render of the same samples with gradient to psi, boxes included; ``score_function`` weights each image's
   influence by the gradient of its bin's log-probability;
7. add ``prior_weight`` times the gradient of psi's KL divergence to uniform, clip the gradient norm and take an
   Adam step on psi, descending ``L_val`` (plus that penalty).

Without a psi optimizer (the *control*) steps 4-7 are skipped: psi never moves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ..poses import PoseSpace
from ..detect import DetectionTargets, DetectorConfig, finetune
from ..seeds import derive_seed
from .config import NeuralSimConfig
from .distribution import PoseDistribution
from .hypergradient import NeuralSimError, hypergradient
from .objective import ValSet, all_finite, detector_targets, flat_norm, val_ap, val_loss_and_grad
from .samples import ClassRenderers, draw_samples, render_training_set
from .trajectory import psi_state

__all__ = ["BilevelProblem", "LoopState", "NeuralSimError", "outer_step"]


@dataclass(frozen=True)
class BilevelProblem:
    """What Neural-Sim learns through and for: the classes' ``renders``, the binned pose ``space``, the ``val``
    set that steers psi (target/val), the loop detector's config, the target distribution (for the
    ``tv_to_target`` column only; None: unknown) and the ``device`` the detector trains on (psi, samples and
    checkpoints stay on the CPU)."""

    renders: ClassRenderers
    space: PoseSpace
    val: ValSet
    detector_cfg: DetectorConfig
    target_probs: Mapping[str, torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def classes(self) -> list[str]:
        return self.renders.classes

    @cached_property
    def val_targets(self) -> DetectionTargets:
        """The detector targets of the val set (float32, on the CPU), encoded once."""
        return detector_targets(self.val.boxes, self.val.labels, self.val.images, self.detector_cfg, torch.float32)


@dataclass
class LoopState:
    """What an outer iteration updates: psi (``dist``) and its optimizer (None: the control), the detector
    and its inner optimizer, and the generator the samples are drawn from."""

    dist: PoseDistribution
    psi_optimizer: torch.optim.Optimizer | None
    detector: torch.nn.Module
    inner_optimizer: torch.optim.Optimizer
    generator: torch.Generator


def _hypergradient(iteration: int, problem: BilevelProblem, state: LoopState, cfg: NeuralSimConfig, samples, train,
                   params: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Steps 4-7: ``dL_val/dpsi`` into ``state.dist``'s ``.grad`` (:func:`~.hypergradient.hypergradient`, by
    ``cfg.estimator``) and one psi update; returns the logged values ``grad_norm`` (before clipping), ``u_norm``
    and, with guarded Neumann, ``lambda_max`` and ``hvp_alpha``."""
    dist, opt = state.dist, state.psi_optimizer
    out = hypergradient(iteration, problem.renders, dist, state.detector, problem.detector_cfg, cfg, samples, train,
                        params, v)
    if cfg.prior_weight > 0:
        (cfg.prior_weight * dist.kl_to_uniform()).backward()  # accumulates onto dL_val/dpsi
    ps = [p for p in dist.parameters() if p.grad is not None]
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ps, cfg.grad_clip)
    opt.step()
    if not all_finite([p.detach() for p in dist.parameters()]):
        raise NeuralSimError(f"Neural-Sim iteration {iteration}: psi became non-finite; try a lower neuralsim.psi_lr")
    return {"grad_norm": out["grad_norm"], "u_norm": out["u_norm"], "lambda_max": out["inverse"].get("lambda_max"),
            "hvp_alpha": out["inverse"].get("alpha")}


def outer_step(iteration: int, problem: BilevelProblem, state: LoopState, cfg: NeuralSimConfig,
               compute_ap: bool) -> dict[str, Any]:
    """One Neural-Sim iteration (module docstring), updating ``state.detector`` and (unless
    ``state.psi_optimizer`` is None: the control) ``state.dist`` in place.

    Returns:
        the logged values: ``val_loss`` (theta after fine-tuning), ``val_AP`` (or None), ``grad_norm``
        (``|dL_val/dpsi|`` before clipping; None for the control), ``train_loss`` (last fine-tuning step),
        ``n_images``, ``tv_to_target`` (after the update; None without a target) and ``probs``
        ``{cls: {factor: [p...]}}`` of the learned factors after the update.

    Raises:
        NeuralSimError: a non-finite validation loss, inverse-HVP, image gradient or psi gradient (psi and
            theta may then hold partial updates: resume from the last checkpoint).
    """
    t0 = time.perf_counter()
    dist, detector = state.dist, state.detector
    samples = draw_samples(dist.space, dist.classes, cfg.images_per_class, problem.renders.camera, state.generator)
    train = render_training_set(problem.renders, dist, samples, cfg.temperature, cfg.relaxation)
    if len(train.images) == 0:
        raise NeuralSimError(f"Neural-Sim iteration {iteration}: none of the {cfg.images_per_class} samples per class "
                             "shows its object (empty renders); check the NeRFs and the pose space")
    history: list[dict] = []
    finetune(detector, train.images, train.boxes, train.labels, cfg.inner_steps, batch_size=cfg.inner_batch_size,
             seed=derive_seed(cfg.seed, 3, iteration), augment=False, optimizer=state.inner_optimizer, history=history)
    detector.eval()
    params = tuple(p for p in detector.parameters() if p.requires_grad)
    val_loss, v = val_loss_and_grad(detector, params, problem.val, problem.val_targets)
    if not (math.isfinite(val_loss) and all_finite(v)):
        raise NeuralSimError(f"Neural-Sim iteration {iteration}: validation loss or its gradient is not finite "
                             f"(L_val = {val_loss}); try a lower neuralsim.inner_lr")
    row: dict[str, Any] = {"val_loss": val_loss, "val_AP": None, "grad_norm": None, "v_norm": flat_norm(v),
                           "train_loss": history[-1]["loss"] if history else None, "n_images": len(train.images)}
    t_img = time.perf_counter()
    if state.psi_optimizer is not None:
        row.update(_hypergradient(iteration, problem, state, cfg, samples, train, params, v))
    row["hypergrad_seconds"] = time.perf_counter() - t_img
    if compute_ap:
        row["val_AP"] = val_ap(detector, problem.val, dist.classes)
    row.update(psi_state(dist, problem.target_probs))
    row["seconds"] = time.perf_counter() - t0
    return row
