"""Relaxed (Gumbel-softmax) pose sampling with stored noise, so the same poses can be rendered twice.

A relaxed sample of one factor with bin centres ``c_b`` (``(bins,)``), bin width ``w`` and logits
``l`` (``(bins,)``, any unnormalized log-probabilities) is::

    weights_b = softmax((l + g) / tau)_b          g: (bins,) standard Gumbel noise
    value     = sum_b weights_b * c_b + (j - 0.5) * w     j: uniform in [0, 1)

The noise ``(g, j)`` is drawn once (:func:`draw_noise`) and stored in a :class:`RelaxedSample`. The
outer loop renders the poses without gradient, fine-tunes the detector, then calls
:func:`relaxed_pose_values` again with the *same* noise and the *same* (not yet updated) logits: the
values, hence poses and images, are bit-identical, and now carry gradients to the logits.

As ``tau -> 0`` the weights become one-hot on ``argmax(l + g)`` (Gumbel-max: that bin is distributed as
``Categorical(softmax(l))``) and the value is uniform inside that bin, i.e. exactly the hard sampler of
:meth:`PoseSpace.sample`.

Azimuth wrap-around: bins of a factor spanning a full turn (``high - low == 360`` degrees, for the
factors listed in ``circular``, default azimuth) are averaged on the circle: the weighted mean of unit
vectors at the centres, taken relative to the centre of the ``argmax(l + g)`` bin
``ref + atan2(sum_b w_b sin(c_b - ref), sum_b w_b cos(c_b - ref))``, so bins 0 and ``bins-1`` are
neighbours (a plain weighted average of 22.5 and 337.5 degrees would be 180). The result is wrapped
into ``[low, low + 360)``. A factor that does not span a full turn is averaged linearly.

Relaxations (``relaxation=``):

* ``"soft"`` (Neural-Sim's): the value above, the weighted (circular) mean of *all* bin centres. What is
  rendered is the soft value and its gradient is exact for it, but at a moderate temperature the weights
  spread over far bins: the rendered view lies between bins (a mixture of bins 90 degrees apart matches
  neither), and near an even split of opposite bins the circular mean's resultant length ``R`` is small,
  so ``d value / d w ~ 1/R`` is heavy-tailed.
* ``"straight_through"`` (``hard=True``): forward the one-hot ``argmax(l + g)`` weights (the rendered pose is
  exactly the hard sampler's: that bin's centre plus jitter), backward the soft weights' gradient of the
  formula above. The temperature then shapes only the gradient: measured on the default run's NeRFs, the
  direction's consistency rose from tau = 0.2 (none) to tau = 1, and the loop learned best at tau = 2 (the
  default; docs/experiments.md): the higher tau, the less the soft weights that scale each logit's
  gradient depend on the Gumbel noise and on the current probabilities.
* ``"neighbour"``: interpolation between the Gumbel-max bin ``k`` and its two neighbours only::

      value = c_k + (j - 0.5) * width + width * (w_{k+1} - w_{k-1}) / (w_{k-1} + w_k + w_{k+1})

  (a missing neighbour at the end of a non-circular factor counts as weight 0). The displacement is at most
  one bin width, vanishes as ``tau -> 0`` (the hard sampler again), and its gradient reaches only the logits
  of ``k`` and its neighbours: raising ``l_{k+1}`` moves the view toward bin ``k+1``. So the image gradient
  of a sample ("would this view help more if turned a little?") moves probability between *adjacent* bins,
  never to a bin on the far side, and the denominator is at least ``w_k`` (the largest weight), so the
  gradient is bounded by ``width / tau``.
* ``"neighbour_st"``: the neighbour relaxation's gradient with the hard sample's forward value (the
  displacement is straight-through: exactly 0 forward), so every rendered view is a proper sample of psi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..cameras import pose_from_spherical

from ..poses import BinnedFactor, PoseSample, PoseSpace
from .distribution import PoseDistribution

__all__ = [
    "RelaxedSample",
    "draw_noise",
    "relaxed_pose_values",
    "relaxed_poses",
    "hard_bins",
    "value_bins",
    "poses_from_values",
    "to_pose_sample",
    "is_circular",
    "RELAXATIONS",
    "HARD_FORWARD_RELAXATIONS",
]

FULL_TURN_DEG = 360.0

#: the relaxations :func:`relaxed_pose_values` implements (module docstring)
RELAXATIONS = ("soft", "straight_through", "neighbour", "neighbour_st")

#: the relaxations whose forward value is exactly the hard (Gumbel-max) sample: the bin ``argmax(l + g)`` at the
#: jitter's position inside it (what the score-function estimator needs)
HARD_FORWARD_RELAXATIONS = ("straight_through", "neighbour_st")


@dataclass
class RelaxedSample:
    """The stored noise of ``n`` relaxed pose samples.

    Attributes:
        gumbel: ``{factor: (n, bins)}`` standard Gumbel noise, float64.
        jitter: ``{factor: (n,)}`` position inside the bin, uniform in ``[0, 1)``, float64.
    """

    gumbel: dict[str, torch.Tensor]
    jitter: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        return int(next(iter(self.jitter.values())).shape[0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int | slice | torch.Tensor) -> "RelaxedSample":
        """Rows ``idx`` of every noise tensor (e.g. a chunk of samples to re-render)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return RelaxedSample({f: g[idx] for f, g in self.gumbel.items()}, {f: j[idx] for f, j in self.jitter.items()})

    def to(self, device: torch.device | str) -> "RelaxedSample":
        return RelaxedSample({f: g.to(device) for f, g in self.gumbel.items()}, {f: j.to(device) for f, j in self.jitter.items()})

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{"gumbel.<factor>": .., "jitter.<factor>": ..}`` for ``torch.save`` (loads with ``weights_only``)."""
        out = {f"gumbel.{f}": g for f, g in self.gumbel.items()}
        out.update({f"jitter.{f}": j for f, j in self.jitter.items()})
        return out

    @classmethod
    def from_tensors(cls, d: Mapping[str, torch.Tensor]) -> "RelaxedSample":
        gumbel = {k.split(".", 1)[1]: v for k, v in d.items() if k.startswith("gumbel.")}
        jitter = {k.split(".", 1)[1]: v for k, v in d.items() if k.startswith("jitter.")}
        return cls(gumbel, jitter)


def draw_noise(space: PoseSpace, n: int, generator: torch.Generator) -> RelaxedSample:
    """Draw the noise of ``n`` relaxed samples for every factor of ``space`` (on the CPU, float64).

    Args:
        space: the binned pose space.
        n: number of samples.
        generator: a CPU generator (the only source of randomness, so a seed reproduces the samples).

    Returns:
        :class:`RelaxedSample` with ``gumbel[f]`` ``(n, bins_f)`` and ``jitter[f]`` ``(n,)``.
    """
    gumbel, jitter = {}, {}
    tiny = torch.finfo(torch.float64).tiny
    for f in PoseSpace.FACTORS:
        bins = space.factor(f).bins
        u = torch.rand(n, bins, generator=generator, dtype=torch.float64).clamp(tiny, 1.0 - 1e-16)
        gumbel[f] = -torch.log(-torch.log(u))
        jitter[f] = torch.rand(n, generator=generator, dtype=torch.float64)
    return RelaxedSample(gumbel, jitter)


def is_circular(factor: BinnedFactor, circular: Sequence[str] = ("azimuth",)) -> bool:
    """Whether ``factor`` is averaged on the circle: listed in ``circular`` and spanning a full turn."""
    return factor.name in circular and abs((factor.high - factor.low) - FULL_TURN_DEG) < 1e-6


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def hard_bins(logits: Mapping[str, torch.Tensor], noise: RelaxedSample) -> dict[str, torch.Tensor]:
    """The Gumbel-max bins ``argmax(l + g)`` per factor, ``{factor: (n,)}`` int64: the bin each relaxed
    sample tends to as the temperature goes to 0 (and the bin of the ``hard=True`` sample)."""
    out = {}
    for f, l in logits.items():
        g = noise.gumbel[f].to(device=l.device, dtype=_float_dtype(l))
        out[f] = (l.detach() + g).argmax(dim=-1)
    return out


def relaxed_pose_values(
    logits: Mapping[str, torch.Tensor],
    noise: RelaxedSample,
    temperature: float,
    space: PoseSpace,
    hard: bool = False,
    circular: Sequence[str] = ("azimuth",),
    relaxation: str | None = None,
) -> dict[str, torch.Tensor]:
    """Relaxed pose values of the stored samples ``noise``, differentiable with respect to ``logits``.

    Args:
        logits: ``{factor: (bins,)}`` unnormalized log-probabilities, e.g. ``PoseDistribution.logits(cls)``
            (to start from probabilities pass ``torch.log(p)``). ``-inf`` marks an impossible bin.
        noise: the stored noise of ``n`` samples (:func:`draw_noise`).
        temperature: Gumbel-softmax temperature ``tau > 0``; lower is closer to hard sampling.
        space: the pose space the bins belong to.
        hard: shorthand for ``relaxation="straight_through"``.
        circular: factors averaged on the circle when they span a full turn (module docstring).
        relaxation: one of :data:`RELAXATIONS` (module docstring); default ``"soft"`` (or
            ``"straight_through"`` with ``hard``).

    Returns:
        ``{factor: (n,)}`` values in the logits' dtype and device: azimuth and elevation in degrees,
        zoom relative to the class's training-camera distance. Same noise and logits give bit-identical values.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    relaxation = relaxation or ("straight_through" if hard else "soft")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"unknown relaxation {relaxation!r}; choose one of {list(RELAXATIONS)}")
    out = {}
    for f in PoseSpace.FACTORS:
        if f not in logits:
            raise KeyError(f"logits for factor {f!r} missing")
        fac = space.factor(f)
        l = logits[f]
        dtype, device = _float_dtype(l), l.device
        if l.shape != (fac.bins,):
            raise ValueError(f"logits of {f!r} must have shape ({fac.bins},), got {tuple(l.shape)}")
        g = noise.gumbel[f].to(device=device, dtype=dtype)  # (n, bins)
        j = noise.jitter[f].to(device=device, dtype=dtype)  # (n,)
        scores = (l.to(dtype) + g) / temperature  # (n, bins)
        w = torch.softmax(scores, dim=-1)
        idx = scores.detach().argmax(dim=-1)  # (n,)
        centres = fac.centres().to(device=device, dtype=dtype)  # (bins,)
        offset = (j - 0.5) * fac.width
        if relaxation in ("neighbour", "neighbour_st"):
            shift = _neighbour_shift(scores, idx, fac.bins, is_circular(fac, circular)) * fac.width
            if relaxation == "neighbour_st":
                shift = shift - shift.detach()  # exactly the hard sample forward, the neighbour gradient back
            value = centres[idx] + offset + shift
            if is_circular(fac, circular):
                value = fac.low + torch.remainder(value - fac.low, FULL_TURN_DEG)
            out[f] = value
            continue
        if relaxation == "straight_through":
            one_hot = torch.nn.functional.one_hot(idx, fac.bins).to(dtype)
            w = one_hot + (w - w.detach())  # exactly one-hot forward, soft gradient
        if is_circular(fac, circular):
            ref = centres[idx]  # (n,)
            delta = torch.deg2rad(centres[None, :] - ref[:, None])  # (n, bins)
            mean_angle = torch.atan2((w * torch.sin(delta)).sum(-1), (w * torch.cos(delta)).sum(-1))
            value = ref + torch.rad2deg(mean_angle) + offset
            value = fac.low + torch.remainder(value - fac.low, FULL_TURN_DEG)
        else:
            value = (w * centres).sum(-1) + offset
        out[f] = value
    return out


def _neighbour_shift(scores: torch.Tensor, idx: torch.Tensor, bins: int, circular: bool) -> torch.Tensor:
    """``(w_{k+1} - w_{k-1}) / (w_{k-1} + w_k + w_{k+1})`` per row, in bin widths, ``(n,)``.

    Computed as a softmax over the three scores ``(l + g) / tau`` of bins ``k-1, k, k+1`` (the same ratio as
    of the full softmax weights), so the other bins' logits get exactly zero gradient.

    Args:
        scores: ``(n, bins)`` Gumbel-softmax scores ``(l + g) / tau``.
        idx: ``(n,)`` the Gumbel-max bin ``k`` of each row.
        circular: neighbours wrap around (bin ``bins-1`` is next to bin 0); otherwise a neighbour past either
            end has weight 0.
    """
    rows = torch.arange(len(idx), device=scores.device)
    up, down = idx + 1, idx - 1
    if circular:
        s_up, s_down = scores[rows, up % bins], scores[rows, down % bins]
    else:
        never = torch.full((), -math.inf, dtype=scores.dtype, device=scores.device)
        s_up = torch.where(up < bins, scores[rows, up.clamp(max=bins - 1)], never)
        s_down = torch.where(down >= 0, scores[rows, down.clamp(min=0)], never)
    w = torch.softmax(torch.stack([s_down, scores[rows, idx], s_up], dim=-1), dim=-1)  # (n, 3)
    return w[:, 2] - w[:, 0]


def relaxed_poses(
    dist: PoseDistribution,
    cls: str,
    noise: RelaxedSample,
    temperature: float,
    hard: bool = False,
    relaxation: str | None = None,
    class_radius: float = 1.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Relaxed values and poses of class ``cls`` of a :class:`PoseDistribution` for stored noise.

    Args:
        class_radius: the class's mean training-camera distance (``intrinsics.json``'s ``radius.mean``), world units
            per unit of zoom (1.0: the zoom values are taken as world units, e.g. for a stand-in renderer).

    Returns:
        ``(values, c2w)``: ``{factor: (n,)}`` (degrees / relative zoom) and ``(n, 4, 4)`` camera-to-world
        poses, both differentiable with respect to ``dist``'s learned logits of class ``cls``.
    """
    values = relaxed_pose_values(dist.logits(cls), noise, temperature, dist.space, hard=hard, relaxation=relaxation)
    return values, poses_from_values(values, class_radius)


def value_bins(values: Mapping[str, torch.Tensor], space: PoseSpace) -> dict[str, torch.Tensor]:
    """The bin each value falls in, ``{factor: (n,)}`` int64 (clamped to ``[0, bins)``; a full-turn
    azimuth wraps)."""
    out = {}
    for f, v in values.items():
        fac = space.factor(f)
        b = torch.floor((v.detach().double() - fac.low) / fac.width).long()
        out[f] = torch.remainder(b, fac.bins) if is_circular(fac) else b.clamp(0, fac.bins - 1)
    return out


def poses_from_values(values: Mapping[str, torch.Tensor], class_radius: float = 1.0) -> torch.Tensor:
    """Look-at camera-to-world poses ``(n, 4, 4)`` at the origin from ``{"azimuth": (n,) deg,
    "elevation": (n,) deg, "zoom": (n,) relative zoom}``, at camera distance ``zoom * class_radius`` (world units),
    differentiable (``pose_from_spherical``)."""
    return pose_from_spherical(
        torch.deg2rad(values["azimuth"]), torch.deg2rad(values["elevation"]), values["zoom"] * float(class_radius)
    )


def to_pose_sample(values: Mapping[str, torch.Tensor], space: PoseSpace) -> PoseSample:
    """A detached :class:`PoseSample` (bins from :func:`value_bins`, float64 values) of relaxed values,
    for code that takes the hard sampler's output (logging, saving the rendered poses)."""
    bins = value_bins(values, space)
    v = {f: values[f].detach().double().cpu() for f in PoseSpace.FACTORS}
    b = {f: bins[f].cpu() for f in PoseSpace.FACTORS}
    return PoseSample(b["azimuth"], b["elevation"], b["zoom"], v["azimuth"], v["elevation"], v["zoom"])
