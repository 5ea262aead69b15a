"""Camera and scene facts derived from a dataset's training cameras (the ``extract_intrinsics`` stage).

Nothing here is hard-coded: the look-at centre, the camera distances and the scene bound all come from
the poses and intrinsics in the transforms file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..cameras import Intrinsics, project
from ..errors import InputError
from ..transforms import Transforms, read_transforms

__all__ = ["look_at_centre", "frustum_bounds", "extract_intrinsics", "camera_radius", "CROPPED_VIEW_FRACTION"]

log = logging.getLogger(__name__)

#: when no point is seen by every camera (some views crop the object), the scene box is taken over the points
#: seen by at least this fraction of the cameras instead
CROPPED_VIEW_FRACTION = 0.5


def look_at_centre(poses: torch.Tensor) -> torch.Tensor:
    """The point ``(3,)`` closest (least squares) to every camera's viewing axis; ``poses`` ``(N, 4, 4)``.

    For cameras on a sphere looking at its centre this is that centre.
    """
    p = poses.double()
    o = p[:, :3, 3]
    d = -p[:, :3, 2]
    d = d / d.norm(dim=-1, keepdim=True)
    proj = torch.eye(3, dtype=torch.float64) - d[:, :, None] * d[:, None, :]  # (N, 3, 3)
    a = proj.sum(0)
    b = (proj @ o[:, :, None]).sum(0)
    if torch.linalg.matrix_rank(a) < 3:  # all axes parallel: no unique point
        return (o + d * o.norm(dim=-1, keepdim=True)).mean(0)
    return torch.linalg.solve(a, b)[:, 0]


def frustum_bounds(
    poses: torch.Tensor, intr: Intrinsics, centre: torch.Tensor, resolution: int = 48, min_fraction: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis-aligned box ``(min (3,), max (3,))`` of the region every camera sees.

    An object that appears whole in every training image lies inside the intersection of all view
    frusta, so this box bounds the scene from the data alone. It is found on a grid of
    ``resolution^3`` points in the cube around ``centre`` of half-size equal to the nearest camera's
    distance. ``min_fraction`` < 1 keeps points seen by at least that fraction of cameras.
    """
    p = poses.double()
    half = float((p[:, :3, 3] - centre).norm(dim=-1).min())
    axis = torch.linspace(-half, half, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3) + centre
    seen = torch.zeros(grid.shape[0], dtype=torch.int32)
    for c2w in p:
        uv, depth = project(grid, c2w, intr)
        inside = (depth > 1e-6) & (uv[:, 0] >= 0) & (uv[:, 0] <= intr.w) & (uv[:, 1] >= 0) & (uv[:, 1] <= intr.h)
        seen += inside.int()
    keep = seen >= max(1, int(round(min_fraction * p.shape[0])))
    if not keep.any():
        raise ValueError("no point is seen by the required fraction of cameras")
    pts = grid[keep]
    step = 2 * half / (resolution - 1)
    return pts.min(0).values - step, pts.max(0).values + step


def extract_intrinsics(transforms: Transforms | str | Path) -> dict[str, Any]:
    """Everything later stages need to know about a dataset's camera and scene, as a JSON-able dict.

    Keys: ``w, h, fl_x, fl_y, cx, cy, camera_angle_x`` (radians), ``n_frames``, ``centre`` (look-at
    point), ``radius`` (``mean/min/max`` camera distance from the centre), ``scene`` with ``aabb_min``,
    ``aabb_max`` (frustum intersection), ``bound`` (half-size of the cube about ``centre`` that holds
    that box: the NeRF's scene bound before normalization) and ``aabb_scale`` (from the file, or null).
    When no point is seen by every camera, the box is that of the points seen by at least
    :data:`CROPPED_VIEW_FRACTION` of them: a warning is logged and ``scene`` gets ``view_fraction`` (that
    fraction; the key is absent when every camera sees the whole box).
    """
    tf = transforms if isinstance(transforms, Transforms) else read_transforms(transforms, check_images=False)
    poses = tf.poses().double()
    intr = tf.intrinsics
    centre = look_at_centre(poses)
    dist = (poses[:, :3, 3] - centre).norm(dim=-1)
    if float(dist.min()) <= 0:
        raise InputError(tf.path, "frames", "a camera sits at the scene centre; cannot derive a scene bound")
    scene_extra: dict[str, float] = {}
    try:
        lo, hi = frustum_bounds(poses, intr, centre)
    except ValueError:
        # some views crop the object: bound by what most cameras see instead, and say so (a looser bound)
        try:
            lo, hi = frustum_bounds(poses, intr, centre, min_fraction=CROPPED_VIEW_FRACTION)
        except ValueError:
            raise InputError(
                tf.path, "frames", "the cameras share no common view region; is this an object-centric dataset?"
            ) from None
        log.warning(
            "%s: no point is seen by all %d cameras (some views crop the object); the scene bound is taken over "
            "the points seen by at least %.0f%% of them (intrinsics.json scene.view_fraction)",
            tf.path, len(tf.frames), 100 * CROPPED_VIEW_FRACTION,
        )
        scene_extra["view_fraction"] = CROPPED_VIEW_FRACTION
    bound = float(torch.maximum((hi - centre).abs(), (lo - centre).abs()).max())
    return {
        **intr.to_dict(),
        "camera_angle_x": intr.fov_x,
        "n_frames": len(tf.frames),
        "centre": centre.tolist(),
        "radius": {"mean": float(dist.mean()), "min": float(dist.min()), "max": float(dist.max())},
        "scene": {"aabb_min": lo.tolist(), "aabb_max": hi.tolist(), "bound": bound, "aabb_scale": tf.aabb_scale,
                  **scene_extra},
        "source": str(tf.path),
    }


def camera_radius(info: Any, source: str | Path | None = None) -> float:
    """The mean training-camera distance of an ``intrinsics.json`` (read from ``source``): the world units of one
    unit of zoom (:class:`~instsim.poses.BinnedFactor`). Raises :class:`InputError` naming ``radius.mean``."""
    try:
        value = info["radius"]["mean"]
    except (KeyError, TypeError):
        raise InputError(source, "radius.mean", "missing (the mean training-camera distance; rerun extract_intrinsics)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value or value == float("inf"):
        raise InputError(source, "radius.mean", f"must be a finite number > 0, got {value!r}")
    return float(value)
