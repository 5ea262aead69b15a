"""Neural-Sim's outer loop: learn the pose distribution psi by implicit differentiation through the detector's
training and the NeRF renderer.

One outer iteration (:func:`outer_step`), for the current psi and detector theta:

1. per class, draw K relaxed pose samples (stored Gumbel noise and jitter), principal-point shifts and
   backgrounds (:func:`draw_samples`), and render them **without gradient** (:func:`render_relaxed`):
   the NeRF's premultiplied rgb over the background, boxes from the opacity (held fixed from here on);
2. fine-tune theta on those images from the previous theta (``inner_steps`` AdamW steps, no augmentation), or
   with ``reset_detector`` from the warm-started theta every iteration;
3. ``v = dL_val/dtheta`` on ``target/val``;
4. ``u ~ H^-1 v`` with ``H`` the Hessian of the training loss on the rendered images (identity / Neumann /
   CG, :func:`~instsim.neuralsim.implicit.inverse_hvp`);
5. per image ``g = -d/dx[(dL_train/dtheta) . u]`` by double backprop
   (:func:`~instsim.neuralsim.implicit.implicit_image_grad`, **minus sign of the implicit-function
   theorem included**);
6. re-render the stored samples in chunks, now with gradient through the NeRF to the poses and from the
   poses to psi (same noise, shifts and backgrounds, same psi: the same images), and backpropagate ``g``:
   ``psi.grad = dL_val/dpsi``;
7. clip the gradient norm and take an Adam step on psi, descending ``L_val``.

The training loss is one function in one mode throughout (the detector's :func:`detection_loss`, mean
over images, no augmentation; the detector has GroupNorm only, so train/eval mode do not differ): the
inner fine-tune, the HVPs and the image gradients all use it.

:func:`optimize_distribution` runs the loop: optional warm start of the detector on samples of the initial
psi, then ``iterations`` outer steps, a row of ``trajectory.tsv`` per iteration, periodic atomic
checkpoints (psi, both optimizers, theta, the sampling generator, the rows so far) that a killed run
resumes from. With ``update_psi=False`` it is the *control*: the same samples, fine-tuning and validation,
but psi never moves (and the hypergradient is not computed), so a gain of the learned run can be told apart
from the extra fine-tuning the loop gives its detector.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..scene.backgrounds import boxes_from_alpha, random_backgrounds
from ..cameras import Intrinsics, PoseSpace
from ..errors import ConfigError, InputError, InstsimError
from ..config_fields import FieldChecks, is_int, is_number
from ..io import load_torch, save_torch
from ..seeds import derive_seed, generator
from .distribution import PoseDistribution
from .implicit import implicit_image_grad, inverse_hvp, make_hvp
from .sampling import RELAXATIONS, RelaxedSample, draw_noise, relaxed_poses

__all__ = [
    "CHECKPOINT_FORMAT",
    "ClassSamples",
    "InverseHVPConfig",
    "NeuralSimConfig",
    "NeuralSimError",
    "PSI_LR_SCHEDULES",
    "ValSet",
    "backprop_image_grad",
    "draw_samples",
    "optimize_distribution",
    "outer_step",
    "psi_lr_at",
    "render_relaxed",
    "render_training_set",
    "trajectory_columns",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "instsim-neuralsim-v1"

#: opacity above which a rendered pixel counts as object for its box (as :data:`instsim.synthesis.BOX_OPACITY`)
BOX_OPACITY = 0.5

#: ``(model, c2w (n, 4, 4), intrinsics, shifts (n, 2), requires_grad) -> (n, H, W, 4)`` premultiplied rgb +
#: opacity; the default is :func:`instsim.synthesis.render_posed` (the NeRF).
Renderer = Callable[[Any, torch.Tensor, Intrinsics, torch.Tensor, bool], torch.Tensor]


class NeuralSimError(InstsimError):
    """The outer loop produced a non-finite value (the last good checkpoint is kept)."""


# ---------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------

INVERSE_HVP_METHODS = ("identity", "neumann", "cg")


@dataclass(frozen=True)
class InverseHVPConfig:
    """How ``u ~ (H + damping I)^-1 v`` is approximated (see :func:`~instsim.neuralsim.implicit.inverse_hvp`).

    method: ``identity`` (``u = v``), ``neumann`` (``k`` terms, step ``alpha``; needs
        ``alpha * (lambda_max + damping) < 2``) or ``cg`` (``k`` conjugate-gradient steps).
    k: Hessian-vector products per outer iteration (ignored by ``identity``).
    alpha: Neumann step size.
    damping: added to the Hessian's diagonal (Neumann and CG); keeps CG sane on a non-convex loss.
    """

    method: str = "neumann"
    k: int = 5
    alpha: float = 0.01
    damping: float = 0.01


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
    psi_lr: Adam learning rate on the logits psi (the first iteration's, with ``psi_lr_schedule: cosine``).
    psi_lr_schedule: ``constant``, or ``cosine``: iteration ``t`` of ``T`` uses ``psi_lr * (1 + cos(pi (t-1) / T)) / 2``,
        meant to let psi settle instead of random-walking at the end (at psi_lr 0.2 it did worse than constant
        0.1 on the default config: README, Neural-Sim section).
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

    iterations: int = 30
    images_per_class: int = 16
    inner_steps: int = 10
    inner_lr: float = 1e-3
    inner_batch_size: int | None = None
    temperature: float = 0.5
    relaxation: str = "soft"
    learned: tuple[str, ...] = ("azimuth", "elevation", "zoom")
    inverse_hvp: InverseHVPConfig = field(default_factory=InverseHVPConfig)
    psi_lr: float = 0.1
    psi_lr_schedule: str = "constant"
    grad_clip: float = 1.0
    pretrain_steps: int = 0
    pretrain_images_per_class: int = 64
    reset_detector: bool = False
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
        if not is_int(ih.k) or ih.k < 0:
            bad("inverse_hvp.k", f"must be an integer >= 0, got {ih.k!r}")
        if not is_number(ih.alpha) or ih.alpha <= 0:
            bad("inverse_hvp.alpha", f"must be a finite number > 0, got {ih.alpha!r}")
        if not is_number(ih.damping) or ih.damping < 0:
            bad("inverse_hvp.damping", f"must be a finite number >= 0, got {ih.damping!r}")

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
        if not isinstance(ih, Mapping):
            raise ConfigError(source, "neuralsim.inverse_hvp", f"must be a mapping {{method, k, alpha, damping}}, got {ih!r}")
        ih_known = {f.name for f in fields(InverseHVPConfig)}
        for key in ih:
            if key not in ih_known:
                raise ConfigError(source, f"neuralsim.inverse_hvp.{key}", f"unknown option (known: {', '.join(sorted(ih_known))})")
        learned = kwargs.get("learned", cls.learned)
        if isinstance(learned, str) or not isinstance(learned, Sequence):
            raise ConfigError(source, "neuralsim.learned", f"must be a list of factor names, got {learned!r}")
        cfg = cls.__new__(cls)
        for f in fields(cls):
            default = f.default if f.default_factory is MISSING else f.default_factory()  # type: ignore[misc]
            object.__setattr__(cfg, f.name, kwargs.get(f.name, default))
        object.__setattr__(cfg, "learned", tuple(learned))
        base = asdict(InverseHVPConfig())
        base.update(ih)
        object.__setattr__(cfg, "inverse_hvp", InverseHVPConfig(**base))
        cfg.validate(source)
        return cfg


# ---------------------------------------------------------------------------------------------------------
# samples and rendering
# ---------------------------------------------------------------------------------------------------------


class ValSet(NamedTuple):
    """The validation (target/val) set: ``images (N, 3, H, W)`` float in [0, 1] (or uint8), per image boxes
    ``(n_i, 4)`` xywh pixels and labels ``(n_i,)`` 0-based (sorted class names), and optionally its COCO
    ground truth dict for the AP (built from the boxes when absent)."""

    images: torch.Tensor
    boxes: Sequence[torch.Tensor]
    labels: Sequence[torch.Tensor]
    coco: Mapping | None = None


@dataclass
class ClassSamples:
    """The stored randomness of ``n`` training images of one class: relaxed-pose noise, principal-point
    ``shifts (n, 2)`` in pixels and ``backgrounds (n, H, W, 3)``. Index it to take a chunk."""

    noise: RelaxedSample
    shifts: torch.Tensor
    backgrounds: torch.Tensor

    def __len__(self) -> int:
        return int(self.shifts.shape[0])

    def __getitem__(self, idx: slice | torch.Tensor) -> ClassSamples:
        return ClassSamples(self.noise[idx], self.shifts[idx], self.backgrounds[idx])


def draw_samples(
    space: PoseSpace, classes: Sequence[str], n: int, image_size: int, max_shift: float, generator: torch.Generator
) -> dict[str, ClassSamples]:
    """``n`` samples per class (in ``classes`` order): noise (:func:`draw_noise`), shifts uniform in
    ``[-max_shift, max_shift]`` pixels (rounded, like the target's) and procedural backgrounds, all from
    ``generator``."""
    out = {}
    for c in classes:
        noise = draw_noise(space, n, generator)
        shifts = ((torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift).round()
        backgrounds = random_backgrounds(n, image_size, generator)
        out[c] = ClassSamples(noise, shifts, backgrounds)
    return out


def _default_renderer(model, c2w, intr, shifts, requires_grad):
    from ..synthesis import render_posed

    return render_posed(model, c2w, intr, shifts, requires_grad=requires_grad)


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    try:
        p = next(model.parameters())
        return p.dtype, p.device
    except (AttributeError, StopIteration):
        return torch.float32, torch.device("cpu")


def render_relaxed(
    model: Any,
    centre: torch.Tensor,
    dist: PoseDistribution,
    cls: str,
    samples: ClassSamples,
    intr: Intrinsics,
    temperature: float,
    requires_grad: bool = False,
    renderer: Renderer | None = None,
    relaxation: str = "soft",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render the relaxed samples of class ``cls``: the NeRF's premultiplied rgb composited over the stored
    backgrounds, ``rgb + (1 - opacity) * background``.

    The poses are :func:`~instsim.neuralsim.sampling.relaxed_poses` (about the origin) moved to look at
    ``centre`` (``intrinsics.json``'s look-at centre). Same ``samples`` and same psi give the same images
    with and without gradient.

    Args:
        model: the class's NeRF (or anything ``renderer`` takes).
        centre: ``(3,)`` world point the cameras look at.
        requires_grad: build the graph from the images back to ``dist``'s logits (through the renderer).
        renderer: see :data:`Renderer`; default the NeRF (:func:`instsim.synthesis.render_posed`).
        relaxation: see :func:`~instsim.neuralsim.sampling.relaxed_pose_values`.

    Returns:
        ``images (n, 3, H, W)`` in [0, 1] on the renderer's device, and ``boxes (n, 4)`` (COCO xywh pixels,
        detached, on the CPU) around ``opacity > 0.5``; an image showing nothing has a zero box.
    """
    renderer = renderer or _default_renderer
    dtype, device = _model_dtype_device(model)
    with torch.set_grad_enabled(requires_grad):
        _, c2w = relaxed_poses(dist, cls, samples.noise, temperature, relaxation=relaxation)
        offset = torch.zeros(4, 4, dtype=c2w.dtype, device=c2w.device)
        offset[:3, 3] = torch.as_tensor(centre, dtype=c2w.dtype, device=c2w.device)
        c2w = (c2w + offset).to(device=device, dtype=dtype)  # translate eye and target by the centre
        rgba = renderer(model, c2w, intr, samples.shifts, requires_grad)
        opacity = rgba[..., 3:4]
        bg = samples.backgrounds.to(device=rgba.device, dtype=rgba.dtype)
        rgb = (rgba[..., :3] + (1 - opacity) * bg).clamp(0, 1)
        images = rgb.permute(0, 3, 1, 2)
    boxes = boxes_from_alpha(rgba[..., 3].detach().float().cpu(), BOX_OPACITY)
    return (images if requires_grad else images.detach()), boxes


@dataclass
class TrainingSet:
    """The rendered training images of one iteration (on the CPU, for the detector) and which stored sample
    each came from: ``index[cls]`` the visible samples of that class, in the order they appear in ``images``."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    index: dict[str, torch.Tensor]


def render_training_set(
    models: Mapping[str, Any],
    centres: Mapping[str, torch.Tensor],
    dist: PoseDistribution,
    samples: Mapping[str, ClassSamples],
    intr: Intrinsics,
    temperature: float,
    renderer: Renderer | None = None,
    relaxation: str = "soft",
) -> TrainingSet:
    """Render every class's samples without gradient; keep the images whose object is visible (a non-empty
    box), labelled by the class's index in ``dist.classes``."""
    images, boxes, labels, index = [], [], [], {}
    for k, c in enumerate(dist.classes):
        with torch.no_grad():
            imgs, bx = render_relaxed(models[c], centres[c], dist, c, samples[c], intr, temperature, False, renderer,
                                          relaxation)
        visible = ((bx[:, 2] > 0) & (bx[:, 3] > 0)).nonzero().flatten()
        index[c] = visible
        images.append(imgs.float().cpu()[visible])
        boxes += [bx[i][None] for i in visible.tolist()]
        labels += [torch.tensor([k], dtype=torch.long) for _ in visible.tolist()]
    return TrainingSet(torch.cat(images), boxes, labels, index)


def backprop_image_grad(
    models: Mapping[str, Any],
    centres: Mapping[str, torch.Tensor],
    dist: PoseDistribution,
    samples: Mapping[str, ClassSamples],
    train: TrainingSet,
    image_grad: torch.Tensor,
    intr: Intrinsics,
    temperature: float,
    chunk: int,
    renderer: Renderer | None = None,
    relaxation: str = "soft",
) -> None:
    """Re-render the visible stored samples with gradient, ``chunk`` images at a time, and backpropagate
    ``image_grad`` (``(n, 3, H, W)``, aligned with ``train.images``) into ``dist``'s logits' ``.grad``
    (accumulated; nothing is computed for, or left on, the NeRFs' weights)."""
    start = 0
    for c in dist.classes:
        idx = train.index[c]
        params = [p for p in dist.learned_parameters(c).values() if p.requires_grad]
        for s in range(0, len(idx), chunk):
            part = idx[s:s + chunk]
            imgs, _ = render_relaxed(models[c], centres[c], dist, c, samples[c][part], intr, temperature, True, renderer,
                                     relaxation)
            g = image_grad[start + s:start + s + len(part)].to(device=imgs.device, dtype=imgs.dtype)
            grads = torch.autograd.grad(imgs, params, grad_outputs=g, allow_unused=True)
            for p, gp in zip(params, grads):
                if gp is not None:
                    p.grad = gp.detach() if p.grad is None else p.grad + gp.detach()
        start += len(idx)


# ---------------------------------------------------------------------------------------------------------
# detector losses
# ---------------------------------------------------------------------------------------------------------


def _targets(boxes, labels, images: torch.Tensor, cfg, dtype):
    from ..detect import encode_targets

    return encode_targets(boxes, labels, tuple(images.shape[2:]), cfg.num_classes, cfg.stride, cfg.min_overlap, dtype=dtype)


def _float_images(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    images = torch.as_tensor(images)
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return x.to(dtype)


def _val_loss_and_grad(model, params: tuple[torch.Tensor, ...], val: ValSet, val_targets, batch: int = 64):
    """``L_val`` (mean over the val images) and ``v = dL_val/dtheta``, accumulated over batches."""
    from ..detect import detection_loss

    n = len(val.images)
    dtype, device = params[0].dtype, params[0].device
    total = torch.zeros((), dtype=torch.float64)
    grads = [torch.zeros_like(p) for p in params]
    for s in range(0, n, batch):
        x = _float_images(val.images[s:s + batch], dtype).to(device)
        t = val_targets.index(slice(s, s + batch)).to(device)
        loss = detection_loss(model, x, t, reduction="sum") / n
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc += g
        total += float(loss.detach())
    return float(total), tuple(grads)


def _val_ap(model, val: ValSet, class_names: Sequence[str]) -> float:
    from ..detect import evaluate_coco, make_coco_gt, predict

    coco = val.coco
    if coco is None:
        coco = make_coco_gt(val.boxes, val.labels, tuple(val.images.shape[2:]), list(class_names))
    dets = predict(model, val.images)
    return float(evaluate_coco(coco, dets)["AP"])


def _flat_norm(vec: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in vec)))


def _all_finite(vec: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in vec)


# ---------------------------------------------------------------------------------------------------------
# one outer iteration
# ---------------------------------------------------------------------------------------------------------


def outer_step(
    *,
    iteration: int,
    models: Mapping[str, Any],
    centres: Mapping[str, torch.Tensor],
    dist: PoseDistribution,
    psi_optimizer: torch.optim.Optimizer | None,
    detector: torch.nn.Module,
    inner_optimizer: torch.optim.Optimizer,
    val: ValSet,
    val_targets,
    intr: Intrinsics,
    max_shift: float,
    generator: torch.Generator,
    cfg: NeuralSimConfig,
    compute_ap: bool,
    target_probs: Mapping[str, torch.Tensor] | None = None,
    renderer: Renderer | None = None,
) -> dict[str, Any]:
    """One Neural-Sim iteration (module docstring), updating ``detector`` and (unless ``psi_optimizer`` is
    None: the control) ``dist`` in place.

    Returns:
        the logged values: ``val_loss`` (theta after fine-tuning), ``val_AP`` (or None), ``grad_norm``
        (``|dL_val/dpsi|`` before clipping; None for the control), ``train_loss`` (last fine-tuning step),
        ``n_images``, ``tv_to_target`` (after the update; None without a target) and ``probs``
        ``{cls: {factor: [p...]}}`` of the learned factors after the update.

    Raises:
        NeuralSimError: a non-finite validation loss, inverse-HVP, image gradient or psi gradient (psi and
            theta may then hold partial updates: resume from the last checkpoint).
    """
    from ..detect import detection_loss, finetune

    t0 = time.perf_counter()
    dcfg = detector.cfg
    size = intr.w
    samples = draw_samples(dist.space, dist.classes, cfg.images_per_class, size, max_shift, generator)
    train = render_training_set(models, centres, dist, samples, intr, cfg.temperature, renderer, cfg.relaxation)
    if len(train.images) == 0:
        raise NeuralSimError(f"Neural-Sim iteration {iteration}: none of the {cfg.images_per_class} samples per class "
                             "shows its object (empty renders); check the NeRFs and the pose space")
    history: list[dict] = []
    finetune(detector, train.images, train.boxes, train.labels, cfg.inner_steps, batch_size=cfg.inner_batch_size,
             seed=derive_seed(cfg.seed, 3, iteration), augment=False, optimizer=inner_optimizer, history=history)
    detector.eval()
    params = tuple(p for p in detector.parameters() if p.requires_grad)
    val_loss, v = _val_loss_and_grad(detector, params, val, val_targets)
    if not (math.isfinite(val_loss) and _all_finite(v)):
        raise NeuralSimError(f"Neural-Sim iteration {iteration}: validation loss or its gradient is not finite "
                             f"(L_val = {val_loss}); try a lower neuralsim.inner_lr")
    row: dict[str, Any] = {"val_loss": val_loss, "val_AP": None, "grad_norm": None, "v_norm": _flat_norm(v),
                           "train_loss": history[-1]["loss"] if history else None, "n_images": len(train.images)}
    t_img = time.perf_counter()
    if psi_optimizer is not None:
        x = train.images.to(device=params[0].device, dtype=params[0].dtype)
        targets = _targets(train.boxes, train.labels, x, dcfg, x.dtype).to(x.device)

        def train_loss(_params, images):
            return detection_loss(detector, images, targets)

        ih = cfg.inverse_hvp
        if ih.method == "identity":
            u = tuple(t.clone() for t in v)
        else:
            u = inverse_hvp(make_hvp(lambda p: train_loss(p, x), params), v, ih.method, ih.k, ih.alpha, ih.damping)
        if not _all_finite(u):
            raise NeuralSimError(f"Neural-Sim iteration {iteration}: the inverse-HVP is not finite; with Neumann keep "
                                 f"inverse_hvp.alpha * lambda_max(H) < 2 (alpha = {ih.alpha}), or add damping")
        g = implicit_image_grad(train_loss, params, x, u)  # minus sign included
        if not bool(torch.isfinite(g).all()):
            raise NeuralSimError(f"Neural-Sim iteration {iteration}: the image gradient is not finite")
        psi_optimizer.zero_grad(set_to_none=False)
        backprop_image_grad(models, centres, dist, samples, train, g, intr, cfg.temperature, cfg.render_chunk, renderer,
                            cfg.relaxation)
        ps = [p for p in dist.parameters() if p.grad is not None]
        grad_norm = _flat_norm([p.grad for p in ps]) if ps else 0.0
        if not math.isfinite(grad_norm):
            raise NeuralSimError(f"Neural-Sim iteration {iteration}: dL_val/dpsi is not finite (through the renderer)")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ps, cfg.grad_clip)
        psi_optimizer.step()
        if not _all_finite([p.detach() for p in dist.parameters()]):
            raise NeuralSimError(f"Neural-Sim iteration {iteration}: psi became non-finite; try a lower neuralsim.psi_lr")
        row["grad_norm"] = grad_norm
        row["u_norm"] = _flat_norm(u)
    row["hypergrad_seconds"] = time.perf_counter() - t_img
    if compute_ap:
        row["val_AP"] = _val_ap(detector, val, dist.classes)
    row.update(_psi_state(dist, target_probs))
    row["seconds"] = time.perf_counter() - t0
    return row


def _psi_state(dist: PoseDistribution, target_probs: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    with torch.no_grad():
        probs = {c: {f: [float(x) for x in p.detach().cpu().double()] for f, p in dist.probs(c).items() if f in dist.learned}
                 for c in dist.classes}
    tv = dist.tv_to(target_probs)["mean"] if target_probs is not None else None
    return {"tv_to_target": tv, "probs": probs}


# ---------------------------------------------------------------------------------------------------------
# trajectory rows
# ---------------------------------------------------------------------------------------------------------

BASE_COLUMNS = ("iteration", "val_loss", "val_AP", "grad_norm", "tv_to_target", "train_loss", "v_norm", "u_norm", "n_images",
                "seconds", "hypergrad_seconds")


def trajectory_columns(dist: PoseDistribution) -> list[str]:
    """``trajectory.tsv``'s columns: :data:`BASE_COLUMNS`, then ``p_<cls>_<factor>_<bin>`` of the learned
    factors (every class, factor and bin)."""
    cols = list(BASE_COLUMNS)
    for c in dist.classes:
        for f in dist.learned:
            cols += [f"p_{c}_{f}_{b}" for b in range(dist.space.factor(f).bins)]
    return cols


def _flatten_row(iteration: int, row: Mapping[str, Any]) -> dict[str, Any]:
    out = {"iteration": iteration}
    for k in BASE_COLUMNS[1:]:
        out[k] = row.get(k)
    for c, per in row["probs"].items():
        for f, ps in per.items():
            for b, p in enumerate(ps):
                out[f"p_{c}_{f}_{b}"] = p
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_trajectory(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` as a TSV with ``columns`` (missing values empty), atomically."""
    from ..io import atomic_path

    lines = ["\t".join(columns)] + ["\t".join(_fmt(r.get(c)) for c in columns) for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------


def _fingerprint(val: ValSet, classes: Sequence[str], space: PoseSpace, target_probs) -> str:
    h = hashlib.sha1()
    h.update(repr((list(classes), space.to_dict())).encode())
    x = torch.as_tensor(val.images)
    h.update(str((tuple(x.shape), str(x.dtype))).encode())
    h.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
    for b, lb in zip(val.boxes, val.labels):
        h.update(np.ascontiguousarray(torch.as_tensor(b, dtype=torch.float64).reshape(-1).numpy()).tobytes())
        h.update(np.ascontiguousarray(torch.as_tensor(lb, dtype=torch.long).reshape(-1).numpy()).tobytes())
    if target_probs is not None:
        h.update(repr({f: [float(p) for p in target_probs[f]] for f in sorted(target_probs)}).encode())
    return h.hexdigest()


def _describe_difference(saved: Any, want: Any) -> str:
    """``saved`` vs ``want`` for a message: for two dicts only the keys that differ (``iterations: 5 vs 3``),
    since a whole config dict hides the one value the user has to look for."""
    if isinstance(saved, Mapping) and isinstance(want, Mapping):
        keys = sorted(set(saved) | set(want), key=str)
        diffs = [f"{k}: {saved.get(k)!r} vs {want.get(k)!r}" for k in keys if saved.get(k) != want.get(k)]
        return "checkpoint vs this run: " + "; ".join(diffs)
    return f"checkpoint {saved!r} vs this run {want!r}"


def _read_checkpoint(path: Path) -> dict:
    return load_torch(path, CHECKPOINT_FORMAT, "a Neural-Sim resume checkpoint", hint="; delete it to start over")


# ---------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------


def _intrinsics_and_shift(target_cfg: Mapping[str, Any]) -> tuple[Intrinsics, float]:
    from ..synthesis import detection_intrinsics

    intr = detection_intrinsics(target_cfg)
    return intr, float(target_cfg["max_shift"]) * intr.w


def _pretrain(models, centres, dist, intr, max_shift, cfg: NeuralSimConfig, det_cfg, renderer, say, device):
    from ..detect import DetectorConfig, build_detector, train_detector

    if cfg.pretrain_steps == 0:
        return build_detector(det_cfg).to(device)
    gen = generator(cfg.seed, 1)
    samples = draw_samples(dist.space, dist.classes, cfg.pretrain_images_per_class, intr.w, max_shift, gen)
    train = render_training_set(models, centres, dist, samples, intr, cfg.temperature, renderer, cfg.relaxation)
    if len(train.images) == 0:
        raise NeuralSimError("Neural-Sim warm start: no rendered sample shows its object; check the NeRFs and pose space")
    pre_cfg = DetectorConfig.from_dict({**det_cfg.to_dict(), "steps": cfg.pretrain_steps})
    say(f"warm start: detector trained {cfg.pretrain_steps} steps on {len(train.images)} images of the initial psi")
    model = train_detector(train.images, train.boxes, train.labels, pre_cfg, progress=False, device=device)
    # the config of the loop's detector is the run's, not the warm start's step count
    model.cfg = det_cfg
    return model.to(device)


def optimize_distribution(
    models: Mapping[str, Any],
    centres: Mapping[str, torch.Tensor],
    space: PoseSpace,
    val_set: ValSet | tuple,
    target_probs: Mapping[str, Sequence[float] | torch.Tensor] | None,
    cfg: NeuralSimConfig,
    detector_cfg,
    target_cfg: Mapping[str, Any],
    seed: int | None = None,
    checkpoint_path: str | Path | None = None,
    log_tsv: str | Path | None = None,
    update_psi: bool = True,
    progress: bool = True,
    renderer: Renderer | None = None,
    init: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    max_iterations: int | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    log_fn: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PoseDistribution, torch.nn.Module, list[dict]]:
    """Run Neural-Sim (or, with ``update_psi=False``, its control) and return ``(dist, detector, rows)``.

    Args:
        models: class name -> NeRF (on its device) or anything ``renderer`` takes.
        centres: class name -> ``(3,)`` look-at centre (``intrinsics.json``'s ``centre``).
        space: the binned pose space.
        val_set: :class:`ValSet` (or a tuple ``(images, boxes, labels[, coco])``) of ``target/val``; labels are
            indices into the sorted class names.
        target_probs: ``{factor: (bins,)}`` target distribution, for ``tv_to_target`` only (None: column empty).
        cfg: :class:`NeuralSimConfig`.
        detector_cfg: the :class:`~instsim.detect.DetectorConfig` of the loop's detector (``num_classes`` =
            number of classes, ``image_size`` the target's).
        target_cfg: ``image_size``, ``fov_deg`` and ``max_shift`` of the config's ``target`` section (the
            detection camera).
        seed: overrides ``cfg.seed`` (the workflow combines the run seed with ``cfg.seed``).
        checkpoint_path: resume state, written atomically every ``cfg.checkpoint_every`` iterations and at the
            end; an existing one is resumed (refused if it belongs to another config, val set or mode).
        log_tsv: ``trajectory.tsv`` rewritten after every iteration (row 0: the initial state).
        update_psi: False runs the control: psi stays exactly at its initial value.
        renderer: see :data:`Renderer` (default: the NeRF).
        init: initial probabilities per class (default uniform).
        max_iterations: stop after this many iterations in total (a checkpoint is written), e.g. to time-box.
        on_iteration: called with each new row (after it is logged).
        log_fn: one-line progress messages.
        device: where the loop's detector trains (fine-tuning, validation gradient, inverse HVP, image
            gradient); psi, the samples and the checkpoints stay on the CPU. The returned detector is on the CPU.

    Rows: ``iteration 0`` is the state before the loop (the warm-started detector's val loss/AP, the initial
    psi); row ``i`` holds the val loss/AP of the detector fine-tuned in iteration ``i`` on samples of
    ``psi_{i-1}``, the hypergradient norm at ``psi_{i-1}``, and the probabilities and TV of ``psi_i``.
    """
    from ..detect import build_detector
    from ..detect.train import param_groups

    say = log_fn or (lambda msg: log.info("%s", msg))
    if seed is not None:
        cfg = NeuralSimConfig.from_dict({**cfg.to_dict(), "seed": int(seed)})
    if not isinstance(val_set, ValSet):
        val_set = ValSet(*val_set)
    classes = sorted(models)
    missing = [c for c in classes if c not in centres]
    if missing:
        raise InputError(None, "centres", f"no look-at centre for {missing}")
    if detector_cfg.num_classes != len(classes):
        raise ConfigError(None, "detector.num_classes", f"{detector_cfg.num_classes} but there are {len(classes)} classes")
    intr, max_shift = _intrinsics_and_shift(target_cfg)
    if tuple(val_set.images.shape[2:]) != (intr.h, intr.w):
        raise InputError(None, "target.image_size", f"val images are {tuple(val_set.images.shape[2:])}, the detection camera "
                         f"is {(intr.h, intr.w)}")
    tprobs = space.check_probs(target_probs, field="target distribution") if target_probs is not None else None
    centres = {c: torch.as_tensor(centres[c], dtype=torch.float64) for c in classes}

    dist = PoseDistribution(space, classes, learned=cfg.learned, init=init)
    adam = torch.optim.Adam(dist.parameters(), lr=cfg.psi_lr)
    sample_gen = generator(cfg.seed, 2)
    val_targets = _targets(val_set.boxes, val_set.labels, val_set.images, detector_cfg, torch.float32)
    fingerprint = _fingerprint(val_set, classes, space, tprobs)
    columns = trajectory_columns(dist)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    identity = {"config": cfg.to_dict(), "detector_config": detector_cfg.to_dict(), "update_psi": bool(update_psi),
                "classes": classes, "fingerprint": fingerprint, "init": repr(init)}

    rows: list[dict] = []
    start = 0
    detector = None
    if ckpt is not None and ckpt.exists():
        ck = _read_checkpoint(ckpt)
        for key, want in identity.items():
            if ck.get(key) != want:
                raise ConfigError(ckpt, key, f"the resume checkpoint was made with another {key} "
                                  f"({_describe_difference(ck.get(key), want)}); delete it to start over")
        dist.load_state_dict(ck["psi"])
        adam.load_state_dict(ck["psi_optimizer"])
        detector = build_detector(detector_cfg).to(device)
        detector.load_state_dict(ck["detector"])
        sample_gen.set_state(ck["generator"])
        rows = [dict(r) for r in ck["rows"]]
        start = int(ck["iteration"])
        say(f"resumed Neural-Sim from {ckpt} at iteration {start}/{cfg.iterations}")
    if detector is None:
        detector = _pretrain(models, centres, dist, intr, max_shift, cfg, detector_cfg, renderer, say, device)
    inner = torch.optim.AdamW(param_groups(detector, detector_cfg.weight_decay), lr=cfg.inner_lr)
    if start > 0:
        inner.load_state_dict(ck["inner_optimizer"])
    # the detector every iteration restarts from with reset_detector (kept in the checkpoint for a resume)
    warm = ({k: t.detach().clone() for k, t in (ck["warm_detector"] if start > 0 else detector.state_dict()).items()}
            if cfg.reset_detector else None)
    if not rows:
        detector.eval()
        params = tuple(p for p in detector.parameters() if p.requires_grad)
        val_loss, _ = _val_loss_and_grad(detector, params, val_set, val_targets)
        row0 = {"val_loss": val_loss, "val_AP": _val_ap(detector, val_set, classes), **_psi_state(dist, tprobs)}
        rows.append(_flatten_row(0, row0))

    last_saved = start if ckpt is not None and ckpt.exists() else None

    def save(iteration: int) -> None:
        nonlocal last_saved
        if ckpt is None:
            return
        save_torch({"format": CHECKPOINT_FORMAT, **identity, "iteration": iteration, "psi": dist.state_dict(),
                    "psi_optimizer": adam.state_dict(), "detector": detector.state_dict(),
                    "inner_optimizer": inner.state_dict(), "generator": sample_gen.get_state(), "rows": rows,
                    **({"warm_detector": warm} if warm is not None else {})}, ckpt)
        last_saved = iteration

    if log_tsv is not None:
        write_trajectory(log_tsv, rows, columns)
    stop = cfg.iterations if max_iterations is None else max(0, min(cfg.iterations, int(max_iterations)))
    if ckpt is not None and start == 0 and not ckpt.exists():
        save(0)  # the warm start is not redone after a kill
    from tqdm.auto import tqdm

    mode = "Neural-Sim" if update_psi else "Neural-Sim control (psi frozen)"
    if start < stop:
        say(f"{mode}: iterations {start + 1}..{stop} of {cfg.iterations}, {cfg.images_per_class} images per class, "
            f"{cfg.inner_steps} inner steps, inverse HVP {cfg.inverse_hvp.method}, learned {list(cfg.learned)}")
    bar = tqdm(total=stop, initial=min(start, stop), desc="neuralsim", unit="it", disable=not progress or start >= stop)
    try:
        for it in range(start + 1, stop + 1):
            for group in adam.param_groups:
                group["lr"] = psi_lr_at(cfg, it)
            if warm is not None:
                detector.load_state_dict(warm)
                inner = torch.optim.AdamW(param_groups(detector, detector_cfg.weight_decay), lr=cfg.inner_lr)
            try:
                row = outer_step(iteration=it, models=models, centres=centres, dist=dist,
                                 psi_optimizer=adam if update_psi else None, detector=detector, inner_optimizer=inner,
                                 val=val_set, val_targets=val_targets, intr=intr, max_shift=max_shift,
                                 generator=sample_gen, cfg=cfg,
                                 compute_ap=(it % cfg.eval_every == 0) or it == cfg.iterations or it == 1,
                                 target_probs=tprobs, renderer=renderer)
            except InstsimError as e:  # NeuralSimError, or the fine-tune's DetectorTrainingError
                where = f" The last good checkpoint (iteration {last_saved}) is kept: {ckpt}." if last_saved is not None else ""
                raise NeuralSimError(f"{str(e).rstrip('.')}.{where}") from None
            flat = _flatten_row(it, row)
            rows.append(flat)
            if log_tsv is not None:
                write_trajectory(log_tsv, rows, columns)
            bar.update(1)
            bar.set_postfix(val_loss=f"{row['val_loss']:.3f}", tv=f"{row['tv_to_target']:.3f}" if row["tv_to_target"] is not None else "-")
            ap = f" AP {row['val_AP']:.3f}" if row["val_AP"] is not None else ""
            gn = f" |grad| {row['grad_norm']:.3g}" if row["grad_norm"] is not None else ""
            tv = f" TV {row['tv_to_target']:.3f}" if row["tv_to_target"] is not None else ""
            say(f"iteration {it}/{cfg.iterations}: L_val {row['val_loss']:.4f}{ap}{gn}{tv} ({row['seconds']:.1f} s)")
            if it % cfg.checkpoint_every == 0 and it < stop:
                save(it)
            if on_iteration is not None:
                on_iteration(flat)
    finally:
        bar.close()
    if start < stop or (ckpt is not None and not ckpt.exists()):
        save(stop)
    return dist, detector.cpu().eval(), rows
