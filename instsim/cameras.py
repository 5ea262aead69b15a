"""THE camera convention of instsim: poses, intrinsics, rays, projection and camera placement on a sphere
(the binned pose space built on it is :mod:`instsim.poses`).

Conventions (the same as Blender / BlenderNeRF / NeRF-synthetic, so their files need no conversion):

* A pose is a camera-to-world matrix ``c2w`` of shape ``(4, 4)`` (or ``(..., 4, 4)``). Its columns
  0, 1, 2 are the camera's x (right), y (up) and z axes in world coordinates; the camera looks down its
  **-z** axis. Column 3 is the camera centre.
* The world is **z-up** (Blender). Spherical camera placement uses azimuth measured in the xy-plane from
  +x towards +y, and elevation above the xy-plane. Angles are **radians** in code; the config and the
  json files the workflow writes use **degrees** and say so in their key names.
* Pixel ``(u, v)``: u grows to the right (column), v grows downwards (row); the centre of the top-left
  pixel is ``(0.5, 0.5)``. ``cx, cy`` are in the same pixel units, so a centred principal point of a
  64x64 image is ``(32, 32)``.
* Ray directions returned by :func:`get_rays` are unit length, so a ray parameter ``t`` is a distance.

Nothing else in instsim flips signs or axes; conversions to other conventions belong here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch

from .errors import InputError

__all__ = [
    "Intrinsics",
    "get_rays",
    "project",
    "look_at",
    "spherical_to_cartesian",
    "pose_from_spherical",
    "spherical_from_pose",
    "rigidity_error",
    "sample_sphere_poses",
]


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels. ``w``/``h`` are the image size, ``fl_*`` focal lengths, ``c*`` the
    principal point (see the module docstring for the pixel convention)."""

    w: int
    h: int
    fl_x: float
    fl_y: float
    cx: float
    cy: float

    @classmethod
    def from_fov(cls, w: int, h: int, fov_x: float, fov_y: float | None = None) -> "Intrinsics":
        """Intrinsics from horizontal (and optionally vertical) field of view in radians, centred principal point.
        Without ``fov_y`` the pixels are square (``fl_y = fl_x``)."""
        fl_x = 0.5 * w / math.tan(0.5 * fov_x)
        fl_y = fl_x if fov_y is None else 0.5 * h / math.tan(0.5 * fov_y)
        return cls(int(w), int(h), fl_x, fl_y, 0.5 * w, 0.5 * h)

    @classmethod
    def from_transforms(cls, meta: Mapping, file: str | None = None) -> "Intrinsics":
        """Intrinsics from a BlenderNeRF / NeRF-synthetic transforms dict.

        ``fl_x``/``fl_y`` win when present. Otherwise ``camera_angle_x`` (and ``camera_angle_y`` when
        given) are used. The BlenderNeRF add-on writes a wrong ``camera_angle_y`` for square images
        (Blender's angle from the sensor height), which is why focal lengths are preferred.
        ``w``/``h`` may be floats in the file (the add-on writes them so); they must be whole numbers.
        """

        def num(key: str) -> float:
            value = meta[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(file, key, f"must be a finite number, got {value!r}")
            return float(value)

        def focal_from_angle(key: str, size: float) -> float:
            angle = num(key)
            if not 0 < angle < math.pi:
                raise InputError(file, key, f"must be in (0, pi) radians, got {angle}")
            return 0.5 * size / math.tan(0.5 * angle)

        for key in ("w", "h"):
            if key not in meta:
                raise InputError(file, key, "missing (image width/height in pixels)")
        w, h = num("w"), num("h")
        for key, value in (("w", w), ("h", h)):
            if value <= 0 or value != int(value):
                raise InputError(file, key, f"must be a positive whole number of pixels, got {value!r}")
        w_i, h_i = int(w), int(h)
        if "fl_x" in meta:
            fl_x = num("fl_x")
            fl_y = num("fl_y") if "fl_y" in meta else fl_x
        elif "camera_angle_x" in meta:
            fl_x = focal_from_angle("camera_angle_x", w)
            fl_y = focal_from_angle("camera_angle_y", h) if "camera_angle_y" in meta else fl_x
        else:
            raise InputError(file, "fl_x", "missing: need 'fl_x' (and 'fl_y') or 'camera_angle_x'")
        for key, value in (("fl_x", fl_x), ("fl_y", fl_y)):
            if value <= 0:
                raise InputError(file, key, f"focal length must be positive, got {value}")
        cx = num("cx") if "cx" in meta else 0.5 * w
        cy = num("cy") if "cy" in meta else 0.5 * h
        return cls(w_i, h_i, fl_x, fl_y, cx, cy)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Intrinsics":
        return cls(int(d["w"]), int(d["h"]), float(d["fl_x"]), float(d["fl_y"]), float(d["cx"]), float(d["cy"]))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def fov_x(self) -> float:
        """Horizontal field of view in radians (for a centred principal point)."""
        return 2.0 * math.atan(0.5 * self.w / self.fl_x)

    @property
    def fov_y(self) -> float:
        return 2.0 * math.atan(0.5 * self.h / self.fl_y)

    def resized(self, w: int, h: int) -> "Intrinsics":
        """The same camera rendered at another resolution (focal lengths and principal point scale)."""
        sx, sy = w / self.w, h / self.h
        return Intrinsics(int(w), int(h), self.fl_x * sx, self.fl_y * sy, self.cx * sx, self.cy * sy)

    def shifted(self, du: float, dv: float) -> "Intrinsics":
        """Principal point moved by ``(du, dv)`` pixels: the image content moves by the same amount."""
        return Intrinsics(self.w, self.h, self.fl_x, self.fl_y, self.cx + du, self.cy + dv)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The 3x3 matrix K mapping camera (x, -y, -z)/(-z) to pixels; see :func:`project`."""
        return torch.tensor(
            [[self.fl_x, 0.0, self.cx], [0.0, self.fl_y, self.cy], [0.0, 0.0, 1.0]], dtype=dtype
        )


def pixel_centres(intr: Intrinsics, device: torch.device | str | None = None) -> torch.Tensor:
    """Pixel-centre coordinates of a full image: ``(h, w, 2)`` holding ``(u, v)``."""
    v, u = torch.meshgrid(
        torch.arange(intr.h, device=device, dtype=torch.float32) + 0.5,
        torch.arange(intr.w, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def camera_directions(intr: Intrinsics, uv: torch.Tensor) -> torch.Tensor:
    """Camera-space ray directions through pixel coordinates ``uv`` ``(..., 2)``: ``(..., 3)``, with z = -1."""
    x = (uv[..., 0] - intr.cx) / intr.fl_x
    y = -(uv[..., 1] - intr.cy) / intr.fl_y
    return torch.stack([x, y, -torch.ones_like(x)], dim=-1)


def get_rays(
    c2w: torch.Tensor, intr: Intrinsics, uv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays for pixels. Differentiable with respect to ``c2w``.

    Args:
        c2w: ``(4, 4)`` or ``(B, 4, 4)`` (``(B, 3, 4)`` also accepted) camera-to-world poses.
        intr: intrinsics shared by all poses.
        uv: pixel coordinates, ``(N, 2)`` (same for all poses) or ``(B, N, 2)``; ``None`` means every
            pixel centre of the image.

    Returns:
        ``rays_o, rays_d``: each ``(..., 3)`` with leading shape ``batch + (h, w)`` when ``uv`` is None,
        else ``batch + (N,)``, where ``batch`` is ``(B,)`` for batched poses and ``()`` otherwise.
        ``rays_d`` is unit length.
    """
    batched = c2w.dim() == 3
    poses = c2w if batched else c2w[None]
    if uv is None:
        uv = pixel_centres(intr, device=poses.device)
    dirs_cam = camera_directions(intr, uv.to(poses.dtype))  # (..., 3)
    rot = poses[:, :3, :3]  # (B, 3, 3)
    lead = dirs_cam.shape[:-1]
    if dirs_cam.dim() >= 2 and uv.dim() == 3 and uv.shape[0] == poses.shape[0]:
        flat = dirs_cam.reshape(poses.shape[0], -1, 3)
        out_lead = lead[1:]
    else:
        flat = dirs_cam.reshape(1, -1, 3).expand(poses.shape[0], -1, 3)
        out_lead = lead
    # R @ v as three broadcast multiply-adds: a batched GEMM with an inner size of 3 is far slower on a GPU
    d = flat[..., 0:1] * rot[:, None, :, 0] + flat[..., 1:2] * rot[:, None, :, 1] + flat[..., 2:3] * rot[:, None, :, 2]
    d = d / d.norm(dim=-1, keepdim=True)
    o = poses[:, None, :3, 3].expand_as(d)
    d = d.reshape(poses.shape[0], *out_lead, 3)
    o = o.reshape(poses.shape[0], *out_lead, 3)
    if not batched:
        return o[0], d[0]
    return o, d


def project(points: torch.Tensor, c2w: torch.Tensor, intr: Intrinsics) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points ``(..., 3)`` into the image of one camera ``c2w`` ``(4, 4)``.

    Returns ``uv`` ``(..., 2)`` in pixels and ``depth`` ``(...,)``: the distance in front of the camera
    along its viewing axis (positive for points the camera sees).
    """
    rot, centre = c2w[:3, :3], c2w[:3, 3]
    cam = (points - centre) @ rot  # world -> camera: R^T (p - c)
    depth = -cam[..., 2]
    u = intr.cx + intr.fl_x * cam[..., 0] / depth
    v = intr.cy - intr.fl_y * cam[..., 1] / depth
    return torch.stack([u, v], dim=-1), depth


def look_at(
    eye: torch.Tensor, target: torch.Tensor | None = None, up: Sequence[float] = (0.0, 0.0, 1.0)
) -> torch.Tensor:
    """Camera-to-world poses ``(..., 4, 4)`` of cameras at ``eye`` ``(..., 3)`` looking at ``target``.

    The camera's y axis is as close to ``up`` as the viewing direction allows. When the viewing
    direction is (nearly) parallel to ``up``, the world y axis is used instead, so straight-down and
    straight-up views are defined. Differentiable with respect to ``eye`` and ``target``.
    """
    if target is None:
        target = torch.zeros_like(eye)
    forward = target - eye
    forward = forward / forward.norm(dim=-1, keepdim=True)
    up_t = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(forward)
    alt = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(forward)
    parallel = (torch.cross(forward, up_t, dim=-1).norm(dim=-1, keepdim=True) < 1e-6)
    up_t = torch.where(parallel, alt, up_t)
    right = torch.cross(forward, up_t, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    cam_up = torch.cross(right, forward, dim=-1)
    z = -forward  # the camera looks down its -z
    rot = torch.stack([right, cam_up, z], dim=-1)  # columns
    top = torch.cat([rot, eye[..., :, None]], dim=-1)  # (..., 3, 4)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device).expand(*eye.shape[:-1], 1, 4)
    return torch.cat([top, bottom], dim=-2)


def spherical_to_cartesian(azimuth: torch.Tensor, elevation: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Points ``(..., 3)`` at ``radius`` from the origin; azimuth from +x towards +y and elevation above the
    xy-plane, both in radians. Inputs broadcast."""
    azimuth, elevation, radius = torch.broadcast_tensors(
        torch.as_tensor(azimuth), torch.as_tensor(elevation), torch.as_tensor(radius)
    )
    ce = torch.cos(elevation)
    return torch.stack(
        [radius * ce * torch.cos(azimuth), radius * ce * torch.sin(azimuth), radius * torch.sin(elevation)], dim=-1
    )


def pose_from_spherical(
    azimuth: torch.Tensor,
    elevation: torch.Tensor,
    radius: torch.Tensor,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Look-at poses ``(..., 4, 4)`` of cameras on a sphere around ``target`` (default origin), looking at it.

    This is the parametrization Neural-Sim optimizes; it is differentiable in all three arguments
    (radians, radians, world units).
    """
    offset = spherical_to_cartesian(azimuth, elevation, radius)
    if target is None:
        target = torch.zeros_like(offset)
    target = torch.as_tensor(target, dtype=offset.dtype).expand_as(offset)
    return look_at(target + offset, target)


def spherical_from_pose(
    c2w: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pose_from_spherical` for the camera centre: ``(azimuth, elevation, radius)`` of
    ``c2w[..., :3, 3]`` about ``target`` (radians, radians, world units)."""
    centre = c2w[..., :3, 3]
    if target is not None:
        centre = centre - torch.as_tensor(target, dtype=centre.dtype)
    radius = centre.norm(dim=-1)
    azimuth = torch.atan2(centre[..., 1], centre[..., 0])
    elevation = torch.asin((centre[..., 2] / radius).clamp(-1.0, 1.0))
    return azimuth, elevation, radius


def rigidity_error(c2w: torch.Tensor) -> torch.Tensor:
    """How far ``c2w[..., :3, :3]`` is from a rotation and the last row from ``[0, 0, 0, 1]``: ``(...,)``.

    Max absolute deviation of ``R^T R`` from the identity, of ``det R`` from 1 and of the bottom row.
    """
    rot = c2w[..., :3, :3]
    eye = torch.eye(3, dtype=c2w.dtype, device=c2w.device)
    ortho = (rot.transpose(-1, -2) @ rot - eye).abs().amax(dim=(-1, -2))
    det = (torch.linalg.det(rot) - 1.0).abs()
    err = torch.maximum(ortho, det)
    if c2w.shape[-2] == 4:
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=c2w.dtype, device=c2w.device)
        err = torch.maximum(err, (c2w[..., 3, :] - bottom).abs().amax(dim=-1))
    return err


def sample_sphere_poses(
    n: int,
    radius: float,
    generator: torch.Generator,
    upper_hemisphere: bool = False,
    min_elevation: float | None = None,
) -> torch.Tensor:
    """``n`` look-at poses ``(n, 4, 4)`` uniformly distributed over the sphere's area (like BlenderNeRF's
    "camera on sphere"), looking at the origin.

    ``upper_hemisphere`` keeps cameras at elevation >= 0; ``min_elevation`` (radians) overrides the lower limit.
    """
    lo = min_elevation if min_elevation is not None else (0.0 if upper_hemisphere else -0.5 * math.pi)
    # area-uniform: sin(elevation) uniform in [sin(lo), 1), kept just below the pole
    z = torch.rand(n, generator=generator, dtype=torch.float64)
    s_lo, s_hi = math.sin(lo), math.sin(0.5 * math.pi * 0.995)
    elevation = torch.asin(s_lo + (s_hi - s_lo) * z)
    azimuth = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    r = torch.full((n,), float(radius), dtype=torch.float64)
    return pose_from_spherical(azimuth, elevation, r).float()
