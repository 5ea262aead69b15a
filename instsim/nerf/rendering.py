"""Ray marching, alpha compositing and the one rendering entry point :func:`render`.

Pipeline for a batch of rays (all in NeRF units, see :mod:`~instsim.nerf.normalization`):

1. :func:`march` chooses sample distances **without gradient**: the fixed lattice ``t_k = (k + u) dt`` from the
   ray origin (``u`` = 0.5 for rendering, random per ray in training), clipped to the box of occupied cells.
   It walks the ray first in coarse segments (skipping segments whose dilated coarse cell is empty), then
   keeps the fine samples whose occupancy cell is occupied.
2. :func:`render_rays` evaluates the network front to back in passes (8, 16, 32, ... samples per ray) and
   stops rays whose transmittance fell below ``min_transmittance`` (early termination on opaque rays). The
   sample positions ``o + t d`` are rebuilt in autograd, so ray origins and directions (and through
   :func:`~instsim.cameras.get_rays` the pose ``c2w``) receive gradients.
3. :func:`composite` turns densities and colours into per-ray colour, opacity and depth.

Because the lattice is anchored at the camera, a small pose change moves every sample with the camera;
the sample *set* only changes where a sample crosses an occupancy-cell or box boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..cameras import Intrinsics, get_rays
from .cuda_ops import render_rays_cuda
from .occupancy import OccupancyGrid

__all__ = ["BACKGROUNDS", "Samples", "march", "composite", "render_rays", "render", "default_chunk", "ray_box", "transmittance", "background_color"]


@dataclass
class Samples:
    """Sample points of a ray batch, sorted by ray then distance.

    ``ray`` ``(M,)`` int64 ray index, ``t`` ``(M,)`` distance from the ray origin (NeRF units), ``dt`` the
    (constant) step, ``rank`` ``(M,)`` the sample's position along its ray (0 = nearest), ``n_rays``.
    """

    ray: torch.Tensor
    t: torch.Tensor
    dt: float
    rank: torch.Tensor
    n_rays: int


def ray_box(
    rays_o: torch.Tensor, rays_d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances ``(R,)`` of rays with the box ``[lo, hi]`` (slab method); ``near >= 0``.
    A ray that misses has ``far <= near``."""
    d = torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    inv = 1.0 / d
    t0 = (lo - rays_o) * inv
    t1 = (hi - rays_o) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


@torch.no_grad()
def march(
    grid: OccupancyGrid,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    dt: float,
    *,
    jitter: torch.Tensor | None = None,
    max_samples: int = 1024,
) -> Samples:
    """Sample distances in occupied cells along rays ``(R, 3)`` (NeRF units, unit directions).

    Args:
        grid: the occupancy grid (its ``bbox``, ``coarse`` and ``occupied``).
        dt: the march step (NeRF units).
        jitter: ``(R,)`` lattice offsets ``u`` in [0, 1); None = 0.5 (deterministic rendering).
        max_samples: cap on samples per ray (the nearest are kept).
    """
    o, d = rays_o.detach(), rays_d.detach()
    n_rays = o.shape[0]
    dev = o.device
    u = torch.full((n_rays,), 0.5, dtype=o.dtype, device=dev) if jitter is None else jitter.to(o.dtype)
    near, far = ray_box(o, d, grid.bbox[0].to(o.dtype), grid.bbox[1].to(o.dtype))
    k_lo = torch.ceil(near / dt - u)
    k_hi = torch.floor(far / dt - u)
    alive = (k_hi >= k_lo).nonzero().squeeze(1)
    empty = Samples(
        torch.zeros(0, dtype=torch.int64, device=dev), o.new_zeros(0), dt, torch.zeros(0, dtype=torch.int64, device=dev), n_rays
    )
    if alive.numel() == 0:
        return empty
    k_lo, k_hi, u_a = k_lo[alive], k_hi[alive], u[alive]
    o_a, d_a = o[alive], d[alive]
    # coarse pass: segments of S steps, S * dt no longer than a coarse cell, so testing the dilated coarse
    # grid at a segment's start is conservative for the whole segment
    seg = max(1, int(math.floor(grid.coarse_cell_size / dt)))
    n_seg = int(((k_hi - k_lo).max().item()) // seg) + 1
    ks = k_lo[:, None] + torch.arange(n_seg, device=dev, dtype=o.dtype)[None, :] * seg  # (Ra, n_seg)
    valid = ks <= k_hi[:, None]
    ts = (ks + u_a[:, None]) * dt
    ps = o_a[:, None, :] + ts[..., None] * d_a[:, None, :]
    valid &= grid.is_occupied_coarse(ps)
    r_idx, s_idx = valid.nonzero(as_tuple=True)  # row-major: sorted by ray, then segment
    if r_idx.numel() == 0:
        return empty
    # fine pass: every lattice point of the kept segments, kept where its cell is occupied
    kf = ks[r_idx, s_idx][:, None] + torch.arange(seg, device=dev, dtype=o.dtype)[None, :]  # (Ms, seg)
    valid = kf <= k_hi[r_idx][:, None]
    tf = (kf + u_a[r_idx][:, None]) * dt
    pf = o_a[r_idx][:, None, :] + tf[..., None] * d_a[r_idx][:, None, :]
    valid &= grid.is_occupied(pf)
    m_idx, j_idx = valid.nonzero(as_tuple=True)
    ray = alive[r_idx[m_idx]]
    t = tf[m_idx, j_idx]
    counts = torch.bincount(ray, minlength=n_rays)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(ray.shape[0], device=dev) - starts[ray]
    if ray.numel() and int(counts.max()) > max_samples:
        keep = rank < max_samples
        ray, t, rank = ray[keep], t[keep], rank[keep]
    return Samples(ray, t, dt, rank, n_rays)


def _ray_starts(ray: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Index of each sample's first sibling (samples sorted by ray)."""
    counts = torch.bincount(ray, minlength=n_rays)
    starts = torch.cumsum(counts, 0) - counts
    return starts[ray]


def transmittance(tau: torch.Tensor, ray: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Transmittance before each sample, ``exp(-sum of earlier tau on the same ray)`` ``(M,)``.

    A segmented exclusive cumulative sum; it runs in float64 because the running sum spans the whole batch
    and float32 would lose the small per-ray differences.
    """
    tau64 = tau.double()
    excl = torch.cumsum(tau64, 0) - tau64
    if ray.numel():
        excl = excl - excl[_ray_starts(ray, n_rays)]
    return torch.exp(-excl).to(tau.dtype)


def composite(
    sigma: torch.Tensor, rgb: torch.Tensor, t: torch.Tensor, dt: float, ray: torch.Tensor, n_rays: int
) -> dict[str, torch.Tensor]:
    """Alpha compositing of samples sorted by ray then distance.

    Args:
        sigma: ``(M,)`` densities; rgb: ``(M, 3)`` colours; t: ``(M,)`` distances; dt: the step;
        ray: ``(M,)`` ray index; n_rays: R.

    Returns:
        ``rgb`` ``(R, 3)`` premultiplied colour (over black), ``opacity`` ``(R,)`` = sum of weights,
        ``depth`` ``(R,)`` = sum of weight * t (same units as ``t``; divide by opacity for the surface
        distance), ``weights`` ``(M,)``. Differentiable in sigma, rgb and t.
    """
    tau = sigma * dt
    alpha = 1.0 - torch.exp(-tau)
    w = transmittance(tau, ray, n_rays) * alpha
    zeros = sigma.new_zeros(n_rays)
    return {
        "rgb": sigma.new_zeros(n_rays, 3).index_add(0, ray, w[:, None] * rgb.to(w.dtype)),
        "opacity": zeros.index_add(0, ray, w),
        "depth": zeros.index_add(0, ray, w * t.to(w.dtype)),
        "weights": w,
    }


def render_rays(
    model,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    *,
    jitter: torch.Tensor | None = None,
    samples: Samples | None = None,
    first_pass: int = 8,
) -> dict[str, torch.Tensor]:
    """Render rays ``(R, 3)`` in NeRF units with early termination.

    Args:
        model: an :class:`~instsim.nerf.network.InstantNerf`.
        rays_o, rays_d: origins and unit directions; gradients flow to both.
        jitter: per-ray lattice offsets (training), see :func:`march`.
        samples: precomputed :class:`Samples` (e.g. to hold the sample distances fixed in a test).
        first_pass: samples per ray in the first network pass; later passes double.

    Returns:
        :func:`composite`'s dict without weights, plus ``n_samples`` (samples composited) and ``n_evals``
        (density evaluations, including those past the termination point) as ints.
    """
    if samples is None and model.uses_cuda_kernels:
        return render_rays_cuda(model, rays_o, rays_d, jitter=jitter)
    cfg = model.cfg
    n_rays = rays_o.shape[0]
    if samples is None:
        samples = march(model.occupancy, rays_o, rays_d, cfg.march_dt, jitter=jitter, max_samples=cfg.max_samples)
    ray, t, rank, dt = samples.ray, samples.t, samples.rank, samples.dt
    min_t = float(cfg.min_transmittance)
    trans = torch.ones(n_rays, dtype=torch.float64, device=rays_o.device)  # running, no grad
    picked, sigmas, geos = [], [], []
    n_evals = 0
    lo, n = 0, first_pass
    max_rank = int(rank.max()) + 1 if rank.numel() else 0
    while lo < max_rank:
        sel = ((rank >= lo) & (rank < lo + n) & (trans[ray] > min_t)).nonzero().squeeze(1)
        if sel.numel() == 0:
            break
        r = ray[sel]
        pts = rays_o[r] + t[sel, None].to(rays_o.dtype) * rays_d[r]  # rebuilt in autograd
        sigma, geo = model.density(pts)
        n_evals += sel.numel()
        tau = sigma.detach().double() * dt
        trans = trans * torch.exp(-torch.zeros_like(trans).index_add_(0, r, tau))
        picked.append(sel)
        sigmas.append(sigma)
        geos.append(geo)
        lo += n
        n *= 2
    out_dtype = torch.promote_types(rays_o.dtype, torch.float32)
    if not picked:
        z = rays_o.new_zeros(n_rays, dtype=out_dtype)
        # keep the graph connected to the rays so callers can always backpropagate
        z = z + 0.0 * rays_o.sum() if rays_o.requires_grad else z
        return {"rgb": z[:, None].expand(n_rays, 3).clone(), "opacity": z, "depth": z.clone(), "n_samples": 0, "n_evals": 0}
    sel = torch.cat(picked)
    order = torch.argsort(sel)
    sel = sel[order]
    sigma = torch.cat(sigmas)[order]
    geo = torch.cat(geos)[order]
    ray_s, t_s = ray[sel], t[sel].to(out_dtype)
    # drop samples behind the termination point before paying for their colour
    trans_s = transmittance(sigma.detach() * dt, ray_s, n_rays)
    keep = (trans_s > min_t).nonzero().squeeze(1)
    ray_s, t_s, sigma, geo = ray_s[keep], t_s[keep], sigma[keep], geo[keep]
    d = rays_d[ray_s]
    rgb = model.color(d, geo)
    out = composite(sigma.to(out_dtype), rgb.to(out_dtype), t_s, dt, ray_s, n_rays)
    out.pop("weights")
    out["n_samples"] = int(keep.numel())
    out["n_evals"] = n_evals
    return out


#: the backgrounds a render can be composited over by name (rgb in [0, 1]); the config's
#: ``nerf.validation_background`` is one of them
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


def background_color(background, like: torch.Tensor) -> torch.Tensor | None:
    """``background`` (None, a name of :data:`BACKGROUNDS`, one grey level or a ``(3,)`` colour) as a ``(3,)``
    tensor of ``like``'s dtype and device; None stays None (premultiplied output)."""
    if background is None:
        return None
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            names = ", ".join(f"'{n}'" for n in BACKGROUNDS)
            raise ValueError(f"background must be None, {names} or 3 numbers, got {background!r}")
        background = BACKGROUNDS[background]
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.numel() == 1:
        bg = bg.expand(3)
    return bg


def default_chunk(cuda_kernels: bool, grad: bool) -> int:
    """Rays per pass of :func:`render` when the caller gives no ``chunk``.

    With the CUDA kernels each pass costs ~130 kernel launches and two host syncs whatever its size, so passes are
    large: 2^21 rays without gradients (the inference loop's memory grows with its step budget only) and 2^18 with
    (about 1 KB of GPU memory per sample). The PyTorch path holds every sample's activations: 2^15 rays.
    """
    if cuda_kernels:
        return 2**18 if grad else 2**21
    return 2**15


def render(
    model,
    c2w: torch.Tensor,
    intrinsics: Intrinsics,
    *,
    background: torch.Tensor | Sequence[float] | str | None = None,
    chunk: int | None = None,
    requires_grad: bool = False,
    uv: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Render a NeRF from world-space camera poses; optionally differentiable with respect to the pose.

    Args:
        model: an :class:`~instsim.nerf.network.InstantNerf` (its normalization and occupancy grid are used).
        c2w: ``(4, 4)`` or ``(B, 4, 4)`` camera-to-world (world units, the :mod:`instsim.cameras` convention).
        intrinsics: shared pinhole intrinsics.
        background: None -> ``rgb`` is premultiplied (composited over black); ``"white"``/``"black"`` or a
            ``(3,)`` colour in [0, 1] -> ``rgb + (1 - opacity) * background``.
        chunk: rays per march/network pass (bounds memory; also applies with gradients), honoured on both paths.
            None: :func:`default_chunk` (2^15 on the PyTorch path; with the CUDA kernels 2^18 with gradients, about
            1 KB of GPU memory per sample, and 2^21 without: fewer, larger passes spend less time launching kernels).
        requires_grad: build the autograd graph (to ``c2w`` and the model's weights). It is also built
            whenever ``c2w.requires_grad`` and grad mode is on. Otherwise rendering runs under no_grad.
        uv: ``(N, 2)`` pixel coordinates to render instead of the full image (``(B, N, 2)`` for per-pose
            pixels), see :func:`~instsim.cameras.get_rays`.

    Returns:
        dict with ``rgb`` ``(..., 3)``, ``opacity`` ``(...,)`` and ``depth`` ``(...,)``: the expected distance
        from the camera in **world units**, weighted by opacity (divide by opacity for the surface
        distance). ``...`` is ``[B,] H, W`` for full images, ``[B,] N`` with ``uv``.
    """
    grad = bool(requires_grad or (c2w.requires_grad and torch.is_grad_enabled()))
    with torch.set_grad_enabled(grad):
        param = next(model.parameters())
        c2w = c2w.to(param.device)
        if not c2w.is_floating_point():
            c2w = c2w.float()
        rays_o, rays_d = get_rays(c2w, intrinsics, None if uv is None else uv.to(c2w.device))
        lead = rays_o.shape[:-1]
        norm = model.normalization
        o = norm.to_nerf(rays_o.reshape(-1, 3))
        d = rays_d.reshape(-1, 3)
        parts: dict[str, list[torch.Tensor]] = {"rgb": [], "opacity": [], "depth": []}
        if chunk is None:
            chunk = default_chunk(model.uses_cuda_kernels, grad)
        elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive number of rays or None, got {chunk!r}")
        for s in range(0, o.shape[0], chunk):
            res = render_rays(model, o[s : s + chunk], d[s : s + chunk])
            for k in parts:
                parts[k].append(res[k])
        out = {k: (torch.cat(v) if v else o.new_zeros((0, 3) if k == "rgb" else (0,))) for k, v in parts.items()}
        out["depth"] = out["depth"] / norm.scale
        bg = background_color(background, out["rgb"])
        if bg is not None:
            out["rgb"] = out["rgb"] + (1.0 - out["opacity"])[:, None] * bg
        return {
            "rgb": out["rgb"].reshape(*lead, 3),
            "opacity": out["opacity"].reshape(lead),
            "depth": out["depth"].reshape(lead),
        }
