"""World coordinates <-> the NeRF's cube, derived from the dataset's cameras (never hard-coded).

The NeRF models the cube ``[-1, 1]^3`` ("NeRF units"). :class:`SceneNormalization` maps the world cube of
half-size ``bound`` about ``centre`` onto it: ``x_nerf = (x_world - centre) * scale`` with
``scale = 1 / bound``. Scaling is isotropic, so unit ray directions stay unit and a NeRF-unit distance is
``scale`` times the world distance. ``centre`` and ``bound`` come from
:func:`instsim.stages.intrinsics.extract_intrinsics` (look-at point of the cameras and the frustum-intersection
cube); they are stored with every checkpoint so a model is never used under another normalization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..errors import InputError

__all__ = ["SceneNormalization"]


@dataclass(frozen=True)
class SceneNormalization:
    """``centre`` (3,) world units, ``scale`` (NeRF units per world unit) and ``bound`` (world half-size of
    the modelled cube; ``scale * bound == 1``)."""

    centre: tuple[float, float, float]
    scale: float
    bound: float

    def __post_init__(self) -> None:
        if len(self.centre) != 3 or not all(math.isfinite(float(c)) for c in self.centre):
            raise InputError(None, "normalization.centre", f"must be 3 finite numbers, got {self.centre!r}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise InputError(None, "normalization.bound", f"must be a positive number, got {self.bound!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise InputError(None, "normalization.scale", f"must be a positive number, got {self.scale!r}")
        if not math.isclose(self.scale * self.bound, 1.0, rel_tol=1e-6):
            raise InputError(
                None, "normalization.scale", f"scale * bound must be 1 (cube [-1, 1]), got {self.scale * self.bound}"
            )

    @classmethod
    def from_bound(cls, centre: Sequence[float], bound: float) -> "SceneNormalization":
        return cls(tuple(float(c) for c in centre), 1.0 / float(bound), float(bound))  # type: ignore[arg-type]

    @classmethod
    def from_intrinsics(cls, info: Mapping[str, Any], source: str | None = None) -> "SceneNormalization":
        """From the dict of :func:`~instsim.stages.intrinsics.extract_intrinsics`: its ``centre`` and ``scene.bound``."""
        src = source or info.get("source")
        try:
            centre = [float(c) for c in info["centre"]]
        except (KeyError, TypeError, ValueError):
            raise InputError(src, "centre", "missing or not 3 numbers (run extract_intrinsics)") from None
        try:
            bound = float(info["scene"]["bound"])
        except (KeyError, TypeError, ValueError):
            raise InputError(src, "scene.bound", "missing or not a number (run extract_intrinsics)") from None
        if len(centre) != 3:
            raise InputError(src, "centre", f"must have 3 entries, got {len(centre)}")
        if not (math.isfinite(bound) and bound > 0):
            raise InputError(src, "scene.bound", f"must be a positive number, got {bound}")
        return cls.from_bound(centre, bound)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SceneNormalization":
        return cls(tuple(float(c) for c in d["centre"]), float(d["scale"]), float(d["bound"]))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"centre": [float(c) for c in self.centre], "scale": float(self.scale), "bound": float(self.bound)}

    def centre_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.centre, dtype=like.dtype, device=like.device)

    def to_nerf(self, points: torch.Tensor) -> torch.Tensor:
        """World points ``(..., 3)`` -> NeRF units (differentiable)."""
        return (points - self.centre_tensor(points)) * self.scale

    def to_world(self, points: torch.Tensor) -> torch.Tensor:
        """NeRF-unit points ``(..., 3)`` -> world units."""
        return points / self.scale + self.centre_tensor(points)
