"""The pose distribution psi that Neural-Sim learns: per class, independent categoricals over binned factors.

For every class and every factor of a :class:`~instsim.poses.PoseSpace` (azimuth, elevation, zoom) there
is a categorical distribution over that factor's bins. The factors named in ``learned`` are
parameterized by a logits :class:`torch.nn.Parameter` of shape ``(bins,)`` (``probs = softmax(logits)``);
the other factors keep fixed probabilities (a buffer, uniform unless given). The published Neural-Sim
code learns azimuth only; the default here learns all three (as the config's ``neuralsim.learned``).

Saved as ``distribution.json``::

    {"classes": {cls: {factor: [p_0, ..., p_{bins-1}]}},   # every factor, learned or not
     "pose_space": {factor: {"bins": .., "low": .., "high": ..}},
     "learned": ["azimuth"]}
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..poses import PoseSample, PoseSpace
from ..errors import InputError

__all__ = ["PoseDistribution", "tv_distance", "LOGIT_FLOOR_PROB"]

#: Learned factors initialised from probabilities use ``logits = log(max(p, LOGIT_FLOOR_PROB))`` so a zero
#: probability gives a finite (trainable) logit instead of ``-inf``.
LOGIT_FLOOR_PROB = 1e-6

ProbsLike = Sequence[float] | torch.Tensor


def _param_key(cls: str, factor: str) -> str:
    # One flat ParameterDict; class names come from the config (^[A-Za-z][A-Za-z0-9_-]*$) and may clash with
    # nn.Module attribute names ("train", "eval"), so they are never used as attribute names on their own.
    return f"{cls}__{factor}"


def _fixed_key(cls: str, factor: str) -> str:
    return f"fixed__{cls}__{factor}"


class PoseDistribution(nn.Module):
    """Per-class, per-factor categorical distributions over the bins of a :class:`PoseSpace`.

    Args:
        space: the binned pose space (azimuth and elevation in degrees, zoom = camera distance).
        classes: class names, in the order the detector uses for its labels.
        learned: the factors whose probabilities are learned (the others stay fixed). Default all three.
        init: optional initial probabilities ``{cls: {factor: (bins,)}}``; a missing class or factor is
            uniform. Each given vector must be non-negative and sum to 1 (it is renormalized).
        dtype: dtype of the logits parameters and the fixed-probability buffers.

    Attributes:
        logits_params: ``nn.ParameterDict`` of the learned logits, each ``(bins,)``; iterate
            ``self.parameters()`` to hand them to an optimizer.
    """

    def __init__(
        self,
        space: PoseSpace,
        classes: Sequence[str],
        learned: Sequence[str] = PoseSpace.FACTORS,
        init: Mapping[str, Mapping[str, ProbsLike]] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        classes = list(classes)
        learned = tuple(learned)
        if not classes:
            raise InputError(None, "classes", "need at least one class")
        if len(set(classes)) != len(classes):
            raise InputError(None, "classes", f"class names must be unique, got {classes}")
        for f in learned:
            if f not in PoseSpace.FACTORS:
                raise InputError(None, "neuralsim.learned", f"unknown factor {f!r}; choose from {list(PoseSpace.FACTORS)}")
        if len(set(learned)) != len(learned):
            raise InputError(None, "neuralsim.learned", f"factors must be unique, got {list(learned)}")
        init = dict(init or {})
        for c in init:
            if c not in classes:
                raise InputError(None, f"init.{c}", f"not one of the classes {classes}")

        self.space = space
        self.classes = classes
        self.learned = tuple(f for f in PoseSpace.FACTORS if f in learned)  # canonical factor order
        self.logits_params = nn.ParameterDict()
        for c in classes:
            given = dict(init.get(c, {}))
            for f in given:
                if f not in PoseSpace.FACTORS:
                    raise InputError(None, f"init.{c}.{f}", f"unknown factor; choose from {list(PoseSpace.FACTORS)}")
            full = {f: given.get(f, space.uniform()[f]) for f in PoseSpace.FACTORS}
            full = {f: torch.as_tensor(v, dtype=torch.float64).detach().cpu().tolist() for f, v in full.items()}
            probs = space.check_probs(full, field=f"init.{c}")
            for f in PoseSpace.FACTORS:
                if f in self.learned:
                    logits = torch.log(probs[f].clamp_min(LOGIT_FLOOR_PROB))
                    self.logits_params[_param_key(c, f)] = nn.Parameter(logits.to(dtype))
                else:
                    self.register_buffer(_fixed_key(c, f), probs[f].to(dtype), persistent=True)

    # ----------------------------------------------------------------------------------------------------
    # views
    # ----------------------------------------------------------------------------------------------------

    def _check_class(self, cls: str) -> None:
        if cls not in self.classes:
            raise KeyError(f"unknown class {cls!r}; the distribution has {self.classes}")

    def logits(self, cls: str) -> dict[str, torch.Tensor]:
        """Unnormalized log-probabilities ``{factor: (bins,)}`` of class ``cls``, for every factor.

        Learned factors return their Parameter itself (so gradients reach it); fixed factors return
        ``log p`` (``-inf`` for zero-probability bins, which the samplers treat as never chosen).
        Pass this to :func:`~instsim.neuralsim.sampling.relaxed_pose_values`.
        """
        self._check_class(cls)
        out = {}
        for f in PoseSpace.FACTORS:
            if f in self.learned:
                out[f] = self.logits_params[_param_key(cls, f)]
            else:
                out[f] = torch.log(self._buffers[_fixed_key(cls, f)])
        return out

    def log_probs(self, cls: str) -> dict[str, torch.Tensor]:
        """Normalized log-probabilities ``{factor: (bins,)}`` (differentiable for learned factors)."""
        return {f: torch.log_softmax(l, dim=-1) for f, l in self.logits(cls).items()}

    def probs(self, cls: str) -> dict[str, torch.Tensor]:
        """Probabilities ``{factor: (bins,)}`` of class ``cls`` (differentiable for learned factors)."""
        return {f: torch.softmax(l, dim=-1) for f, l in self.logits(cls).items()}

    def kl_to_uniform(self) -> torch.Tensor:
        """``sum_{class, learned factor} KL(p || uniform)`` in nats, a differentiable scalar (0 at uniform)."""
        total = torch.zeros((), dtype=torch.float64)
        for c in self.classes:
            for f, lp in self.log_probs(c).items():
                if f in self.learned:
                    total = total + (lp.exp() * (lp + math.log(lp.numel()))).sum().to(total.dtype)
        return total

    def learned_parameters(self, cls: str) -> dict[str, nn.Parameter]:
        """The logits Parameters ``{factor: (bins,)}`` of class ``cls`` (learned factors only)."""
        self._check_class(cls)
        return {f: self.logits_params[_param_key(cls, f)] for f in self.learned}

    def sample(self, cls: str, n: int, generator: torch.Generator) -> PoseSample:
        """``n`` hard (non-relaxed) poses of class ``cls`` drawn from the current probabilities, e.g. to make
        the final training set from the learned psi. Same sampler as the target domain
        (:meth:`PoseSpace.sample`)."""
        with torch.no_grad():
            probs = {f: p.detach().cpu().double() for f, p in self.probs(cls).items()}
        return self.space.sample(probs, n, generator)

    def tv_to(self, target: Mapping[str, Mapping[str, ProbsLike]] | Mapping[str, ProbsLike],
              factors: Sequence[str] | None = None) -> dict[str, Any]:
        """Total-variation distance of every class to a target.

        Args:
            target: ``{factor: (bins,)}`` shared by all classes (as the config's ``target.distribution``) or
                ``{cls: {factor: (bins,)}}``.
            factors: factors to compare; default the learned ones (all factors when none is learned).

        Returns:
            ``{"per_class": {cls: {factor: tv}}, "per_class_mean": {cls: mean}, "mean": float}``.
        """
        factors = list(factors) if factors is not None else (list(self.learned) or list(PoseSpace.FACTORS))
        shared = all(k in PoseSpace.FACTORS for k in target)
        per_class, per_mean = {}, {}
        for c in self.classes:
            tgt = target if shared else target[c]
            with torch.no_grad():
                per_class[c], per_mean[c] = tv_distance(self.probs(c), tgt, factors)
        return {"per_class": per_class, "per_class_mean": per_mean, "mean": sum(per_mean.values()) / len(per_mean)}

    # ----------------------------------------------------------------------------------------------------
    # distribution.json
    # ----------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``distribution.json`` content: probabilities of every class and factor, the pose space and
        the learned factors (see the module docstring)."""
        with torch.no_grad():
            classes = {
                c: {f: [float(x) for x in p.detach().cpu().double()] for f, p in self.probs(c).items()}
                for c in self.classes
            }
        return {"classes": classes, "pose_space": self.space.to_dict(), "learned": list(self.learned)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None,
                  dtype: torch.dtype = torch.float32) -> "PoseDistribution":
        """Rebuild from :meth:`to_dict` output (e.g. a ``distribution.json`` read from ``source``).

        Learned logits are set to ``log p`` (floored at :data:`LOGIT_FLOOR_PROB`), so :meth:`probs` gives
        back the saved probabilities. Raises :class:`InputError` naming the field at fault.
        """
        for key in ("classes", "pose_space", "learned"):
            if key not in d:
                raise InputError(source, key, "missing")
        if not isinstance(d["classes"], Mapping) or not d["classes"]:
            raise InputError(source, "classes", "must be a non-empty mapping class -> {factor: probabilities}")
        if not isinstance(d["learned"], Sequence) or isinstance(d["learned"], str):
            raise InputError(source, "learned", f"must be a list of factor names, got {d['learned']!r}")
        try:
            space = PoseSpace.from_config(d["pose_space"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(source, "pose_space", f"needs {{factor: {{bins, low, high}}}} for {list(PoseSpace.FACTORS)}: {e}") from None
        for f in d["learned"]:
            if f not in PoseSpace.FACTORS:
                raise InputError(source, "learned", f"unknown factor {f!r}; choose from {list(PoseSpace.FACTORS)}")
        init = {}
        for c, probs in d["classes"].items():
            if not isinstance(probs, Mapping):
                raise InputError(source, f"classes.{c}", "must map factor -> probabilities")
            init[c] = space.check_probs(probs, source=source, field=f"classes.{c}")
        return cls(space, list(init), learned=d["learned"], init=init, dtype=dtype)

    def extra_repr(self) -> str:
        return f"classes={self.classes}, learned={list(self.learned)}"


def tv_distance(
    p: Mapping[str, ProbsLike], q: Mapping[str, ProbsLike], factors: Sequence[str] | None = None
) -> tuple[dict[str, float], float]:
    """Total-variation distance ``0.5 * sum_b |p_b - q_b|`` per factor, and their mean.

    Args:
        p, q: ``{factor: (bins,)}`` probabilities (tensors or lists).
        factors: the factors to compare; default those present in both ``p`` and ``q`` (in ``p``'s order).

    Returns:
        ``({factor: tv}, mean_tv)``, every value in ``[0, 1]``.
    """
    factors = list(factors) if factors is not None else [f for f in p if f in q]
    if not factors:
        raise ValueError("no factor to compare")
    per = {}
    for f in factors:
        a = torch.as_tensor(p[f], dtype=torch.float64).detach().cpu()
        b = torch.as_tensor(q[f], dtype=torch.float64).detach().cpu()
        if a.shape != b.shape:
            raise ValueError(f"factor {f!r}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        per[f] = 0.5 * float((a - b).abs().sum())
    return per, math.fsum(per.values()) / len(per)
