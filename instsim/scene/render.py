"""instsim's own renderer for capsule scenes: analytic ray-capsule intersection in torch, Lambert + ambient
shading under a light fixed in the **world**, supersampled anti-aliasing, straight alpha from coverage.

Conventions: cameras and rays are those of :mod:`instsim.cameras` (``c2w`` Blender/OpenGL, rays from
:func:`~instsim.cameras.get_rays`, unit directions so ray parameters are distances in world units).
Images are ``(B, H, W, C)`` float32 in [0, 1], row 0 at the top.

Speed: only rays that hit the scene's bounding sphere are intersected, in chunks of ``chunk`` rays against all
``K`` capsules at once (``(chunk, K)`` tensors; dot products as matrix products). Each ray is re-based at its
closest approach to the bounding-sphere centre before intersecting, so float32 stays accurate at any camera
distance. Rendering runs under ``torch.no_grad`` (not differentiable) and is deterministic.

On a shared, oversubscribed CPU torch's multi-threaded kernels wait for the busiest core: rendering with
``torch.set_num_threads(1)`` was 5-8x faster than with 2 threads on a 2-core machine at load ~5 (see
``benchmarks/bench_scene_render.py``). This module never changes the thread count itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..cameras import Intrinsics, get_rays
from .hand import Scene

__all__ = [
    "DEFAULT_LIGHT",
    "DEFAULT_AMBIENT",
    "DEFAULT_NORMAL_BLEND",
    "subpixel_uv",
    "intersect_capsules",
    "capsule_normals",
    "shade",
    "render_scene",
    "render_alpha_depth",
]

#: direction **towards** the light in world coordinates (z-up): from above, on the palm (+x) and thumb (+y) side.
DEFAULT_LIGHT = (0.4, 0.3, 0.87)
#: ambient term: a surface facing away from the light gets ``ambient * albedo``.
DEFAULT_AMBIENT = 0.45
#: world units over which shading normals of touching capsules are blended (soft creases).
DEFAULT_NORMAL_BLEND = 0.015

# palm-side tint: blend weight goes 0 -> 1 as dot(normal, palm_dir) goes over this range (smoothstep)
_PALM_BLEND = (0.0, 0.35)


@dataclass(frozen=True)
class _Prepared:
    """Per-capsule constants for intersection, all float32 on the scene's device."""

    a: torch.Tensor  # (K, 3)
    b: torch.Tensor  # (K, 3)
    axis: torch.Tensor  # (K, 3) unit a->b (zero for a sphere)
    length: torch.Tensor  # (K,)
    r2: torch.Tensor  # (K,)
    a_axis: torch.Tensor  # (K,) dot(a, axis)
    a_sq: torch.Tensor  # (K,) |a|^2
    b_sq: torch.Tensor  # (K,)
    centre: torch.Tensor  # (3,) bounding sphere centre
    bound: float  # bounding sphere radius


def _prepare(scene: Scene) -> _Prepared:
    a, b, r = scene.a.float(), scene.b.float(), scene.radius.float()
    ba = b - a
    length = ba.norm(dim=-1)
    axis = torch.where(length[:, None] > 0, ba / length.clamp_min(1e-12)[:, None], torch.zeros_like(ba))
    lo = (torch.minimum(a, b) - r[:, None]).min(dim=0).values
    hi = (torch.maximum(a, b) + r[:, None]).max(dim=0).values
    centre = 0.5 * (lo + hi)
    reach = torch.maximum((a - centre).norm(dim=-1), (b - centre).norm(dim=-1)) + r
    return _Prepared(
        a, b, axis, length, r * r, (a * axis).sum(-1), (a * a).sum(-1), (b * b).sum(-1), centre,
        float(reach.max()) * (1 + 1e-5) + 1e-6,
    )


def subpixel_uv(intr: Intrinsics, supersample: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Sample positions ``(H*s*W*s, 2)`` in pixels (u, v) on a regular ``s x s`` grid inside every pixel, in
    row-major order of the fine ``(H*s, W*s)`` grid: pixel ``(u0, v0)`` gets ``u0 + (i + 0.5) / s``. With
    ``s = 1`` these are the pixel centres."""
    s = int(supersample)
    v, u = torch.meshgrid(
        (torch.arange(intr.h * s, device=device, dtype=torch.float32) + 0.5) / s,
        (torch.arange(intr.w * s, device=device, dtype=torch.float32) + 0.5) / s,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1).reshape(-1, 2)


def _intersect_prepared(o: torch.Tensor, d: torch.Tensor, p: _Prepared, near: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest capsule hit of rays ``o, d`` ``(N, 3)`` (unit ``d``): ``t (N,)`` (inf for a miss), index ``(N,)``."""
    # re-base each ray at its closest approach to the bounding-sphere centre: all terms below are O(1)
    t0 = ((p.centre - o) * d).sum(-1)  # (N,)
    o = o + t0[:, None] * d
    o_sq = (o * o).sum(-1, keepdim=True)  # (N, 1)
    d_axis = d @ p.axis.T  # (N, K)
    o_axis = o @ p.axis.T - p.a_axis  # dot(o - a, axis)
    d_oa = (d * o).sum(-1, keepdim=True) - d @ p.a.T  # dot(d, o - a)
    oa_sq = o_sq - 2.0 * (o @ p.a.T) + p.a_sq  # |o - a|^2
    inf = torch.tensor(float("inf"), dtype=o.dtype, device=o.device)

    # infinite cylinder, then keep hits between the end caps' planes
    qa = 1.0 - d_axis * d_axis
    qb = d_oa - o_axis * d_axis
    qc = oa_sq - o_axis * o_axis - p.r2
    disc = qb * qb - qa * qc
    t_body = (-qb - disc.clamp_min(0.0).sqrt()) / qa.clamp_min(1e-12)
    y = o_axis + t_body * d_axis
    t = torch.where((disc >= 0) & (qa > 1e-9) & (y >= 0) & (y <= p.length), t_body, inf)

    # sphere at a
    disc = d_oa * d_oa - (oa_sq - p.r2)
    t = torch.minimum(t, torch.where(disc >= 0, -d_oa - disc.clamp_min(0.0).sqrt(), inf))
    # sphere at b
    d_ob = d_oa - (d @ (p.b - p.a).T)  # dot(d, o - b)
    disc = d_ob * d_ob - (o_sq - 2.0 * (o @ p.b.T) + p.b_sq - p.r2)
    t = torch.minimum(t, torch.where(disc >= 0, -d_ob - disc.clamp_min(0.0).sqrt(), inf))

    t = t + t0[:, None]
    t = torch.where(t > near, t, inf)  # entry point behind the camera (or the camera inside): no hit
    t_min, idx = t.min(dim=-1)
    return t_min, idx


@torch.no_grad()
def intersect_capsules(
    rays_o: torch.Tensor, rays_d: torch.Tensor, scene: Scene, near: float = 0.0, chunk: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic first hit of rays with the union of the scene's capsules (cylinder body + two sphere caps each).

    Args:
        rays_o, rays_d: ``(..., 3)`` ray origins and **unit** directions (world units).
        near: hits at ``t <= near`` are ignored. Ray origins must lie outside every capsule.
        chunk: rays intersected at once.

    Returns:
        ``t`` ``(...,)``: distance to the first hit, ``inf`` for a miss; ``index`` ``(...,)`` int64: the capsule
        hit (meaningless where ``t`` is inf).
    """
    p = _prepare(scene)
    lead = rays_o.shape[:-1]
    o, d = rays_o.reshape(-1, 3).float(), rays_d.reshape(-1, 3).float()
    ts, ids = [], []
    for s in range(0, o.shape[0], chunk):
        t, i = _intersect_prepared(o[s : s + chunk], d[s : s + chunk], p, near)
        ts.append(t)
        ids.append(i)
    if not ts:
        return torch.empty(lead), torch.empty(lead, dtype=torch.long)
    return torch.cat(ts).reshape(lead), torch.cat(ids).reshape(lead)


def capsule_normals(
    points: torch.Tensor, index: torch.Tensor, scene: Scene, blend: float = 0.0, chunk: int = 1 << 13
) -> torch.Tensor:
    """Unit outward normals ``(N, 3)`` at surface ``points`` ``(N, 3)`` (world units) of capsules ``index`` ``(N,)``.

    With ``blend > 0`` (world units) the normal is a soft-min blend of the normals of all capsules within a few
    ``blend`` of the point (weights ``exp(-distance / blend)``), which rounds the creases where capsules meet
    (palm, knuckles) in the shading; the geometry is unchanged. ``blend = 0``: the hit capsule's own normal.
    """
    if blend <= 0:
        a, b = scene.a[index], scene.b[index]
        ba = b - a
        h = (((points - a) * ba).sum(-1) / (ba * ba).sum(-1).clamp_min(1e-20)).clamp(0.0, 1.0)
        n = points - (a + h[:, None] * ba)
        return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ba = scene.b - scene.a  # (K, 3)
    ba_sq = (ba * ba).sum(-1).clamp_min(1e-20)
    out = []
    for s in range(0, points.shape[0], chunk):
        pa = points[s : s + chunk, None, :] - scene.a  # (n, K, 3)
        h = ((pa * ba).sum(-1) / ba_sq).clamp(0.0, 1.0)
        v = pa - h[..., None] * ba
        dist = v.norm(dim=-1).clamp_min(1e-12)
        gap = dist - scene.radius  # signed distance to each capsule, ~0 for the hit one
        excess = (gap - gap.min(dim=-1, keepdim=True).values) / blend
        w = torch.exp(-excess.clamp(max=40.0))  # clamped: no float32 denormals (slow on CPU)
        n = ((w / dist)[..., None] * v).sum(dim=1)
        out.append(n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.cat(out) if out else points.new_zeros(0, 3)


def shade(
    normals: torch.Tensor,
    index: torch.Tensor,
    scene: Scene,
    light_dir: torch.Tensor,
    ambient: float,
) -> torch.Tensor:
    """RGB ``(N, 3)`` of surface points: albedo (blended to the palm-side albedo where the normal faces the
    primitive's ``palm_dir``) times ``ambient + (1 - ambient) * max(0, n . light_dir)``, clamped to [0, 1].
    ``light_dir`` ``(3,)`` is the unit direction towards the light in world coordinates."""
    albedo = scene.albedo[index].float()
    if scene.palm_albedo is not None and scene.palm_dir is not None:
        facing = (normals * scene.palm_dir[index]).sum(-1)
        lo, hi = _PALM_BLEND
        w = ((facing - lo) / (hi - lo)).clamp(0.0, 1.0)
        w = w * w * (3.0 - 2.0 * w)  # smoothstep
        albedo = albedo + w[:, None] * (scene.palm_albedo[index].float() - albedo)
    lambert = (normals @ light_dir).clamp_min(0.0)
    return (albedo * (ambient + (1.0 - ambient) * lambert)[:, None]).clamp(0.0, 1.0)


def _poses(c2w: torch.Tensor) -> torch.Tensor:
    c2w = torch.as_tensor(c2w, dtype=torch.float32)
    if c2w.dim() == 2:
        c2w = c2w[None]
    if c2w.dim() != 3 or c2w.shape[-2:] not in ((4, 4), (3, 4)):
        raise ValueError(f"c2w must be (4, 4) or (B, 4, 4), got {tuple(c2w.shape)}")
    return c2w


#: rays (views x sub-samples) generated at once; views are traced in groups of about this many rays.
_GROUP_RAYS = 1 << 20


def _trace_views(
    scene: Scene, c2w: torch.Tensor, intr: Intrinsics, supersample: int, chunk: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Trace the views in groups of ``G`` views (about :data:`_GROUP_RAYS` rays), yielding per group: a hit mask
    ``(G, N)`` over the fine grid of ``N = H*s*W*s`` rays per view, and for the ``M`` hit rays their origins and
    directions ``(M, 3)``, ``t`` ``(M,)`` and capsule index ``(M,)``, in the row-major order of the mask.

    Rays missing the scene's bounding sphere are never intersected. Tracing several views at once keeps the
    number of torch calls small, which matters on a loaded CPU where every multi-threaded call waits for the
    slowest core."""
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    p = _prepare(scene)
    uv = subpixel_uv(intr, supersample, device=scene.a.device)
    group = max(1, _GROUP_RAYS // uv.shape[0])
    for first in range(0, c2w.shape[0], group):
        poses = c2w[first : first + group].to(scene.a.device)
        o, d = get_rays(poses, intr, uv)  # (G, N, 3) each
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        rel = p.centre - o
        t_mid = (rel * d).sum(-1)
        miss2 = (rel * rel).sum(-1) - t_mid * t_mid
        cand = ((miss2 <= p.bound * p.bound) & (t_mid + p.bound > 0)).nonzero().squeeze(-1)
        t_all, k_all = [], []
        for s in range(0, cand.numel(), chunk):
            sel = cand[s : s + chunk]
            t, k = _intersect_prepared(o[sel], d[sel], p, 0.0)
            t_all.append(t)
            k_all.append(k)
        t_c = torch.cat(t_all) if t_all else torch.empty(0, device=o.device)
        k_c = torch.cat(k_all) if k_all else torch.empty(0, dtype=torch.long, device=o.device)
        hit_c = torch.isfinite(t_c)
        hit_rows = cand[hit_c]
        hit = torch.zeros(o.shape[0], dtype=torch.bool, device=o.device)
        hit[hit_rows] = True
        yield hit.reshape(poses.shape[0], -1), o[hit_rows], d[hit_rows], t_c[hit_c], k_c[hit_c]


def _downsample(values: torch.Tensor, intr: Intrinsics, s: int) -> torch.Tensor:
    """Sum fine-grid values ``(G, H*s*W*s, C)`` over each pixel's ``s x s`` samples: ``(G, H, W, C)``."""
    g, c = values.shape[0], values.shape[-1]
    return values.reshape(g, intr.h, s, intr.w, s, c).sum(dim=(2, 4))


@torch.no_grad()
def render_scene(
    scene: Scene,
    c2w: torch.Tensor,
    intr: Intrinsics,
    supersample: int = 2,
    light_dir: Sequence[float] = DEFAULT_LIGHT,
    ambient: float = DEFAULT_AMBIENT,
    chunk: int = 1 << 16,
    normal_blend: float = DEFAULT_NORMAL_BLEND,
) -> torch.Tensor:
    """Render the scene from cameras ``c2w``.

    Args:
        scene: capsules in world units (e.g. :func:`~instsim.scene.gestures.make_hand`).
        c2w: ``(4, 4)`` or ``(B, 4, 4)`` camera-to-world poses (:mod:`instsim.cameras` convention).
        intr: intrinsics shared by all views; the image is ``intr.h x intr.w``.
        supersample: ``s``: ``s x s`` rays per pixel on a regular sub-pixel grid (1: pixel centres only).
        light_dir: direction towards the light **in world coordinates** (normalized here). Fixed to the world,
            so turning the camera around the hand changes the shading as well as the silhouette.
        ambient: light reaching every surface, in [0, 1]; the directional light contributes ``1 - ambient``.
        chunk: rays intersected at once (memory ~ ``chunk * K * 4`` bytes per temporary).
        normal_blend: world units over which the shading normals of touching capsules are blended
            (see :func:`capsule_normals`); 0 shows the raw capsule normals with sharp creases.

    Returns:
        ``(B, H, W, 4)`` float32 in [0, 1] (``B = 1`` for a single ``(4, 4)`` pose): RGB is the mean colour of
        the covered sub-samples (**straight, not premultiplied, alpha**) and 0 where nothing is covered; alpha is
        the fraction of covered sub-samples. No background.
    """
    poses = _poses(c2w)
    s = int(supersample)
    light = torch.as_tensor(light_dir, dtype=torch.float32, device=scene.a.device)
    light = light / light.norm()
    out = []
    for hit, o, d, t, k in _trace_views(scene, poses, intr, s, chunk):
        rgb_fine = torch.zeros(*hit.shape, 3, dtype=torch.float32, device=hit.device)
        if k.numel():
            pts = o + t[:, None] * d
            rgb_fine[hit] = shade(capsule_normals(pts, k, scene, normal_blend, chunk), k, scene, light, float(ambient))
        cover = _downsample(hit[..., None].float(), intr, s)  # (G, H, W, 1) number of covered samples
        rgb = _downsample(rgb_fine, intr, s) / cover.clamp_min(1.0)
        out.append(torch.cat([rgb.clamp(0.0, 1.0), cover / (s * s)], dim=-1))
    return torch.cat(out)


@torch.no_grad()
def render_alpha_depth(
    scene: Scene, c2w: torch.Tensor, intr: Intrinsics, supersample: int = 1, chunk: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage and depth without shading.

    Returns:
        ``alpha`` ``(B, H, W)``: covered fraction of each pixel's ``supersample x supersample`` rays;
        ``depth`` ``(B, H, W)``: mean distance along the (unit) rays to the first hit over the covered rays, in
        world units (ray distance, not z-depth), 0 where nothing is covered.
    """
    poses = _poses(c2w)
    s = int(supersample)
    alphas, depths = [], []
    for hit, _o, _d, t, _k in _trace_views(scene, poses, intr, s, chunk):
        t_fine = torch.zeros(*hit.shape, 1, dtype=torch.float32, device=hit.device)
        t_fine[hit] = t[:, None]
        cover = _downsample(hit[..., None].float(), intr, s)[..., 0]
        alphas.append(cover / (s * s))
        depths.append(_downsample(t_fine, intr, s)[..., 0] / cover.clamp_min(1.0))
    return torch.cat(alphas), torch.cat(depths)
