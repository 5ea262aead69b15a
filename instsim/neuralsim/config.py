"""Settings of the Neural-Sim outer loop: the config's ``neuralsim`` section as :class:`NeuralSimConfig`.

The defaults are the validated defaults of the workflow's ``config.yaml`` (a test keeps them equal), i.e. the
settings the README reports as working; ``docs/experiments.md`` tells how they were chosen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..poses import PoseSpace
from ..config_fields import FieldChecks, dataclass_from_values, is_number
from ..errors import ConfigError
from .estimator import BASELINES, ESTIMATORS
from .implicit import INVERSE_HVP_METHODS
from .sampling import HARD_FORWARD_RELAXATIONS, RELAXATIONS

__all__ = ["INVERSE_HVP_METHODS", "PSI_LR_SCHEDULES", "InverseHVPConfig", "NeuralSimConfig", "psi_lr_at"]



@dataclass(frozen=True)
class InverseHVPConfig:
    """How ``u ~ (H + damping I)^-1 v`` is approximated (see :func:`~instsim.neuralsim.implicit.inverse_hvp`).

    method: ``identity`` (``u = v``), ``neumann`` (``k`` terms, step ``alpha``; needs
        ``alpha * (lambda_max + damping) < 2``) or ``cg`` (``k`` conjugate-gradient steps).
    k: Hessian-vector products per outer iteration (ignored by ``identity``).
    alpha: Neumann step size.
    damping: added to the Hessian's diagonal (Neumann and CG); keeps CG sane on a non-convex loss.
    power_iters: Neumann's curvature guard: power-iteration HVPs that estimate ``lambda_max`` so the step is
        ``min(alpha, 1 / lambda_max)`` (0: ``alpha`` as given, which flips the sign of directions with
        ``alpha * lambda > 2``).
    """

    method: str = "neumann"
    k: int = 5
    alpha: float = 0.01
    damping: float = 0.01
    power_iters: int = 8


#: how the learning rate on psi changes over the outer iterations (:attr:`NeuralSimConfig.psi_lr_schedule`)
PSI_LR_SCHEDULES = ("constant", "cosine")


def psi_lr_at(cfg: "NeuralSimConfig", iteration: int) -> float:
    """The Adam learning rate on psi of outer iteration ``iteration`` (1-based) under ``cfg.psi_lr_schedule``."""
    if cfg.psi_lr_schedule == "cosine":
        return cfg.psi_lr * 0.5 * (1.0 + math.cos(math.pi * (iteration - 1) / cfg.iterations))
    return cfg.psi_lr


@dataclass(frozen=True)
class NeuralSimConfig:
    """Settings of the Neural-Sim outer loop (the config's ``neuralsim`` section).

    iterations: outer iterations (psi updates).
    images_per_class: K, relaxed samples rendered per class and iteration.
    inner_steps: N, fine-tuning steps of the detector per iteration, from the previous theta.
    inner_lr: AdamW learning rate of the fine-tuning (the optimizer's moments persist across iterations).
    inner_batch_size: images per fine-tuning step (``null``: the detector's ``batch_size``).
    temperature: Gumbel-softmax temperature tau of the relaxed pose samples (lower: closer to hard samples,
        noisier gradients).
    relaxation: how a relaxed sample depends on psi (:data:`~instsim.neuralsim.sampling.RELAXATIONS`):
        ``soft`` (Neural-Sim's weighted circular mean of all bin centres), ``straight_through``,
        ``neighbour`` (interpolation toward the two bins next to the Gumbel-max bin) or ``neighbour_st``
        (its gradient with the hard sample rendered); see :mod:`instsim.neuralsim.sampling`.
    learned: the pose factors whose distribution is learned; the others stay at their initial
        (uniform) probabilities.
    inverse_hvp: :class:`InverseHVPConfig`.
    estimator: how ``dL_val/dpsi`` is estimated (:data:`~instsim.neuralsim.estimator.ESTIMATORS`): ``pathwise``
        (through the renderer, the boxes' dependence on the pose included), ``pathwise_fixed_box`` (the boxes
        held fixed, Neural-Sim's) or ``score_function`` (each image's influence times the gradient of its bin's
        log-probability; no render gradient; needs a relaxation whose forward is the hard sample).
    baseline: the score-function estimator's control variate (:data:`~instsim.neuralsim.estimator.BASELINES`):
        ``leave_one_out`` (the mean influence of the class's other samples), ``per_factor`` (also removes, from each
        factor's term, the main effects of the sample's bins of the other factors) or ``none``.
    prior_weight: beta >= 0: psi descends ``L_val + beta * sum_{class, learned factor} KL(p || uniform)``; the
        KL term pulls a factor back toward uniform unless the hypergradient keeps pushing it away (0: off).
    psi_lr: Adam learning rate on the logits psi (the first iteration's, with ``psi_lr_schedule: cosine``).
    psi_lr_schedule: ``constant``, or ``cosine``: iteration ``t`` of ``T`` uses ``psi_lr * (1 + cos(pi (t-1) / T)) / 2``,
        meant to let psi settle instead of random-walking at the end (at psi_lr 0.2 it did worse than constant
        0.1 on the default config: docs/experiments.md).
    grad_clip: max global norm of dL_val/dpsi before the Adam step (0 disables).
    pretrain_steps: detector warm start before the loop: steps of ordinary detector training (the
        detector's own schedule and augmentation) on samples of the initial psi (0: start from scratch).
    pretrain_images_per_class: images per class rendered for the warm start.
    reset_detector: every outer iteration fine-tunes from the warm-started detector (fresh inner optimizer)
        instead of from the previous iteration's weights, so the inner solution ``theta(psi)`` depends on the
        current psi only, not on the whole trajectory, and the hypergradient is always taken at a detector of the
        same training stage (False: Neural-Sim's persistent detector).
    eval_every: COCO AP on target/val every this many iterations (and at the first and last).
    checkpoint_every: iterations between resume checkpoints.
    render_chunk: images re-rendered with gradient at once (bounds the autograd graph's memory).
    seed: seeds pose samples, shifts, backgrounds and the fine-tuning shuffles (combined with the run's seed
        by the workflow).
    """

    iterations: int = 50
    images_per_class: int = 16
    inner_steps: int = 10
    inner_lr: float = 1e-3
    inner_batch_size: int | None = None
    temperature: float = 2.0
    relaxation: str = "straight_through"
    learned: tuple[str, ...] = ("azimuth", "elevation", "zoom")
    inverse_hvp: InverseHVPConfig = field(default_factory=InverseHVPConfig)
    estimator: str = "score_function"
    baseline: str = "per_factor"
    prior_weight: float = 0.0
    psi_lr: float = 0.05
    psi_lr_schedule: str = "constant"
    grad_clip: float = 1.0
    pretrain_steps: int = 300
    pretrain_images_per_class: int = 64
    reset_detector: bool = True
    eval_every: int = 1
    checkpoint_every: int = 5
    render_chunk: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "learned", tuple(self.learned))
        if isinstance(self.inverse_hvp, Mapping):
            object.__setattr__(self, "inverse_hvp", InverseHVPConfig(**self.inverse_hvp))
        self.validate()

    def validate(self, source: str | Path | None = None) -> None:
        """Raise :class:`ConfigError` naming ``neuralsim.<key>`` for any impossible value."""

        check = FieldChecks("neuralsim", source)
        bad = check.fail
        check.ints(self, ("iterations", "images_per_class", "eval_every", "checkpoint_every", "render_chunk",
                          "pretrain_images_per_class"), 1)
        check.ints(self, ("inner_steps", "pretrain_steps", "seed"), 0)
        check.ints(self, ("inner_batch_size",), 1, optional=True)
        check.numbers(self, ("inner_lr", "temperature", "psi_lr"), 0, strict=True)
        if not is_number(self.grad_clip) or self.grad_clip < 0:
            bad("grad_clip", f"must be a finite number >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if self.psi_lr_schedule not in PSI_LR_SCHEDULES:
            bad("psi_lr_schedule", f"must be one of {list(PSI_LR_SCHEDULES)}, got {self.psi_lr_schedule!r}")
        if self.relaxation not in RELAXATIONS:
            bad("relaxation", f"must be one of {list(RELAXATIONS)}, got {self.relaxation!r}")
        if not isinstance(self.reset_detector, bool):
            bad("reset_detector", f"must be true or false, got {self.reset_detector!r}")
        if not self.learned:
            bad("learned", "name at least one factor to learn")
        for f in self.learned:
            if f not in PoseSpace.FACTORS:
                bad("learned", f"unknown factor {f!r}; choose from {list(PoseSpace.FACTORS)}")
        if len(set(self.learned)) != len(self.learned):
            bad("learned", f"factors must be unique, got {list(self.learned)}")
        ih = self.inverse_hvp
        if ih.method not in INVERSE_HVP_METHODS:
            bad("inverse_hvp.method", f"must be one of {list(INVERSE_HVP_METHODS)}, got {ih.method!r}")
        ih_check = FieldChecks("neuralsim.inverse_hvp", source)
        ih_check.ints(ih, ("k",), 0)
        ih_check.numbers(ih, ("alpha",), 0, strict=True)
        ih_check.numbers(ih, ("damping",), 0)
        ih_check.ints(ih, ("power_iters",), 0)
        if self.estimator not in ESTIMATORS:
            bad("estimator", f"must be one of {list(ESTIMATORS)}, got {self.estimator!r}")
        if self.baseline not in BASELINES:
            bad("baseline", f"must be one of {list(BASELINES)}, got {self.baseline!r}")
        check.numbers(self, ("prior_weight",), 0)
        if self.estimator == "score_function" and self.relaxation not in HARD_FORWARD_RELAXATIONS:
            bad("estimator", f"score_function needs the rendered pose to be the hard sample of its bin: relaxation "
                             f"{list(HARD_FORWARD_RELAXATIONS)}, got {self.relaxation!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (``learned`` as a list)."""
        d = asdict(self)
        d["learned"] = list(self.learned)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str | Path | None = None) -> NeuralSimConfig:
        """From the config's ``neuralsim`` section; missing keys take their defaults, unknown keys (also inside
        ``inverse_hvp``) and bad values raise :class:`ConfigError` naming ``neuralsim.<key>``."""
        d = {} if d is None else d
        kwargs = FieldChecks("neuralsim", source).known_keys(d, (f.name for f in fields(cls)), "Neural-Sim option")
        ih = kwargs.get("inverse_hvp", {})
        if isinstance(ih, InverseHVPConfig):
            ih = asdict(ih)
        ih = FieldChecks("neuralsim.inverse_hvp", source).known_keys(ih, (f.name for f in fields(InverseHVPConfig)), "option")
        learned = kwargs.get("learned", cls.learned)
        if isinstance(learned, str) or not isinstance(learned, Sequence):
            raise ConfigError(source, "neuralsim.learned", f"must be a list of factor names, got {learned!r}")
        kwargs["learned"] = tuple(learned)
        kwargs["inverse_hvp"] = InverseHVPConfig(**{**asdict(InverseHVPConfig()), **ih})  # checked with the whole
        return dataclass_from_values(cls, kwargs, source)
