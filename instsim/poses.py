"""The binned pose space: azimuth, elevation and zoom split into equal bins, the factorized categorical
distribution Neural-Sim optimizes and the target samples from (poses follow :mod:`instsim.cameras`).

Zoom is the camera distance as a multiple of a class's mean training-camera distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .cameras import pose_from_spherical
from .errors import InputError

__all__ = ["BinnedFactor", "PoseSample", "PoseSpace"]


@dataclass(frozen=True)
class BinnedFactor:
    """One pose factor split into ``bins`` equal bins over ``[low, high)``.

    Azimuth and elevation are in degrees; zoom is the camera distance as a multiple of the class's mean
    training-camera distance (``intrinsics.json``'s ``radius.mean``), so a bin means the same for every class
    whatever its scale: multiply by that radius for world units (:meth:`PoseSample.poses`).
    """

    name: str
    low: float
    high: float
    bins: int

    def edges(self) -> torch.Tensor:
        """``(bins + 1,)`` bin edges."""
        return torch.linspace(self.low, self.high, self.bins + 1, dtype=torch.float64)

    def centres(self) -> torch.Tensor:
        """``(bins,)`` bin centres."""
        e = self.edges()
        return 0.5 * (e[:-1] + e[1:])

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.bins

    def value(self, bin_index: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
        """Values for bin indices ``(n,)`` with jitter in ``[0, 1)`` ``(n,)`` placing them inside their bin."""
        return self.low + (bin_index.to(torch.float64) + jitter.to(torch.float64)) * self.width


@dataclass
class PoseSample:
    """A batch of ``n`` sampled poses: per factor the bin index ``(n,)`` and the value ``(n,)``
    (degrees for angles; ``zoom`` relative to the class's training-camera distance, see :class:`BinnedFactor`)."""

    azimuth_bin: torch.Tensor
    elevation_bin: torch.Tensor
    zoom_bin: torch.Tensor
    azimuth_deg: torch.Tensor
    elevation_deg: torch.Tensor
    zoom: torch.Tensor

    def camera_distance(self, class_radius: float | torch.Tensor) -> torch.Tensor:
        """``(n,)`` camera distances in world units: the zoom times ``class_radius`` (a float, or ``(n,)`` per pose:
        each pose's class's mean training-camera distance)."""
        return self.zoom * torch.as_tensor(class_radius, dtype=self.zoom.dtype)

    def poses(self, class_radius: float | torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, 4, 4)`` float32 look-at poses about ``target`` (default the origin), at
        :meth:`camera_distance` ``(class_radius)``."""
        return pose_from_spherical(
            torch.deg2rad(self.azimuth_deg), torch.deg2rad(self.elevation_deg), self.camera_distance(class_radius), target
        ).float()


@dataclass(frozen=True)
class PoseSpace:
    """The three binned factors of a camera pose: azimuth (deg), elevation (deg), zoom (camera distance as a multiple
    of each class's mean training-camera distance, see :class:`BinnedFactor`)."""

    azimuth: BinnedFactor
    elevation: BinnedFactor
    zoom: BinnedFactor

    FACTORS = ("azimuth", "elevation", "zoom")
    #: most bins of one factor (one per degree of azimuth)
    MAX_BINS = 360

    @classmethod
    def from_config(cls, cfg: Mapping, source: str | None = None, field: str = "pose_space") -> "PoseSpace":
        """From the config's ``pose_space`` section: ``{factor: {bins, low, high}}``.

        Raises :class:`InputError` naming ``source`` and ``<field>.<factor>[.<key>]`` for a missing factor or key,
        bins not an integer in ``[1, MAX_BINS]``, ``high <= low``, a zoom (camera distance) that is not positive or
        an elevation outside ``[-90, 90]`` degrees."""
        factors = []
        for f in cls.FACTORS:
            sec = cfg.get(f) if isinstance(cfg, Mapping) else None
            if not isinstance(sec, Mapping):
                raise InputError(source, f"{field}.{f}", "missing: needs {bins, low, high}")
            for key in ("bins", "low", "high"):
                if key not in sec:
                    raise InputError(source, f"{field}.{f}.{key}", "missing")
            bins, low, high = sec["bins"], sec["low"], sec["high"]
            if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= cls.MAX_BINS:
                raise InputError(source, f"{field}.{f}.bins", f"must be an integer in [1, {cls.MAX_BINS}], got {bins!r}")
            for key, v in (("low", low), ("high", high)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise InputError(source, f"{field}.{f}.{key}", f"must be a finite number, got {v!r}")
            if not high > low:
                raise InputError(source, f"{field}.{f}", f"high ({high}) must be greater than low ({low})")
            factors.append(BinnedFactor(f, float(low), float(high), bins))
        if not factors[2].low > 0:
            raise InputError(source, f"{field}.zoom.low", "the camera distance must be positive")
        if factors[1].low < -90 or factors[1].high > 90:
            raise InputError(source, f"{field}.elevation", "elevation must lie within [-90, 90] degrees")
        return cls(*factors)

    def factor(self, name: str) -> BinnedFactor:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {f: {"bins": self.factor(f).bins, "low": self.factor(f).low, "high": self.factor(f).high} for f in self.FACTORS}

    def uniform(self) -> dict[str, torch.Tensor]:
        """Every bin equally likely: ``{factor: (bins,)}``."""
        return {f: torch.full((self.factor(f).bins,), 1.0 / self.factor(f).bins, dtype=torch.float64) for f in self.FACTORS}

    def check_probs(self, probs: Mapping[str, Sequence[float]], source: str | None = None, field: str = "distribution") -> dict[str, torch.Tensor]:
        """Validate per-factor probabilities (length = bins, non-negative, summing to 1 within 1e-6 and
        renormalized) and return them as float64 tensors."""
        out = {}
        for f in self.FACTORS:
            if f not in probs:
                raise InputError(source, f"{field}.{f}", "missing probabilities for this factor")
            p = torch.as_tensor(list(probs[f]), dtype=torch.float64)
            bins = self.factor(f).bins
            if p.shape != (bins,):
                raise InputError(source, f"{field}.{f}", f"needs {bins} probabilities (one per bin), got {p.numel()}")
            if not torch.isfinite(p).all() or (p < 0).any():
                raise InputError(source, f"{field}.{f}", f"probabilities must be finite and >= 0, got {p.tolist()}")
            total = float(p.sum())
            if abs(total - 1.0) > 1e-3:
                raise InputError(source, f"{field}.{f}", f"probabilities must sum to 1, they sum to {total:.6f}")
            out[f] = p / total
        return out

    def sample(self, probs: Mapping[str, torch.Tensor], n: int, generator: torch.Generator) -> PoseSample:
        """Draw ``n`` poses: a bin per factor from its categorical, then a uniform position inside the bin."""
        idx, val = {}, {}
        for f in self.FACTORS:
            p = torch.as_tensor(probs[f], dtype=torch.float64)
            idx[f] = torch.multinomial(p, n, replacement=True, generator=generator)
            jitter = torch.rand(n, generator=generator, dtype=torch.float64)
            val[f] = self.factor(f).value(idx[f], jitter)
        return PoseSample(idx["azimuth"], idx["elevation"], idx["zoom"], val["azimuth"], val["elevation"], val["zoom"])
