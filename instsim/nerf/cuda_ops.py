"""The CUDA kernels (``cuda/``) behind the :mod:`instsim.nerf` API: autograd Functions and the two ray loops.

Each Function mirrors a PyTorch-path function and is tested against it (``tests/test_cuda.py``):

* :func:`hash_encode` - :class:`~instsim.nerf.encoding.HashEncoding` forward, gradients to the table and to
  the positions;
* :func:`sh_encode` - :func:`~instsim.nerf.encoding.sh_encode` (degree 4), gradient to the directions;
* :func:`composite` - :func:`~instsim.nerf.rendering.composite` with early termination; gradients to the
  densities and colours (sample distances are held fixed), which reach the positions ``o + t d`` through the
  network and so the ray origins and directions: the pose gradient;
* :func:`march_packed` - every sample of a ray batch (training and rendering with gradients);
* :func:`render_rays_packed` / :func:`render_rays_inference` - the two loops :func:`render_rays_cuda` picks
  between: all samples at once in autograd, or a few samples per alive ray per step without gradient, with
  finished rays compacted away (torch-ngp's inference scheme).

Only first derivatives: Neural-Sim differentiates the render once (the detector's second derivative is taken
with respect to the rendered images, not through the NeRF).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from ..backend import load_kernels
from .occupancy import OccupancyGrid

__all__ = [
    "HashEncode",
    "HashEncodeHalfTable",
    "composite",
    "half_table",
    "hash_encode",
    "kernels_for",
    "march_inputs",
    "march_packed",
    "render_rays_cuda",
    "render_rays_inference",
    "render_rays_packed",
    "sh_encode",
]


_OFF = ("0", "false", "no", "off")


def kernels_for(t: torch.Tensor) -> ModuleType:
    """The compiled kernels of the GPU that holds ``t``."""
    return load_kernels(t.device.index if t.device.index is not None else torch.cuda.current_device())


class HashEncode(torch.autograd.Function):
    """The hash-grid kernels as an autograd Function (called through :func:`hash_encode`; public for gradcheck)."""

    @staticmethod
    def forward(ctx, x, table, res, offsets, dense, log2_table: int):  # type: ignore[override]
        x = x.contiguous()
        out = kernels_for(x).hash_encode_forward(x, table, res, offsets, dense, log2_table)
        ctx.save_for_backward(x, table, res, offsets, dense)
        ctx.log2_table = log2_table
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, table, res, offsets, dense = ctx.saved_tensors
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_table, grad_x = kernels_for(x).hash_encode_backward(
            grad_out.contiguous(), x, table, res, offsets, dense, ctx.log2_table, need_table, need_x
        )
        return (grad_x if need_x else None), (grad_table if need_table else None), None, None, None, None


class HashEncodeHalfTable(torch.autograd.Function):
    """The hash-grid forward from an entry-major half-precision copy of a two-feature table (made by
    :func:`half_table`), with the table gradient accumulated entry-major and returned as ``(2, S)``: half the
    gathers' bytes and half the atomics of :class:`HashEncode`. No position gradient (for the training step, whose
    sample positions need none). Public for its test."""

    @staticmethod
    def forward(ctx, x, table, table_h2, res, offsets, dense, log2_table: int):  # type: ignore[override]
        x = x.contiguous()
        out = kernels_for(x).hash_encode_forward_h2(x, table_h2, res, offsets, dense, log2_table)
        ctx.save_for_backward(x, res, offsets, dense)
        ctx.log2_table, ctx.table_size = log2_table, table.shape[1]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, res, offsets, dense = ctx.saved_tensors
        grad = kernels_for(x).hash_encode_backward_f2(
            grad_out.float().contiguous(), x, ctx.table_size, res, offsets, dense, ctx.log2_table
        )
        return None, grad.t().contiguous(), None, None, None, None, None


def half_table(encoding, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """An entry-major ``(S, 2)`` float16 copy of a two-feature float32 table (into ``out`` if given), or None
    where :class:`HashEncodeHalfTable` does not apply (other feature counts or dtypes, ``INSTSIM_HALF_TABLE=0``)."""
    table = encoding.table
    if table.shape[0] != 2 or table.dtype != torch.float32 or os.environ.get("INSTSIM_HALF_TABLE", "1") in _OFF:
        return None
    if out is None:
        out = torch.empty(table.shape[1], 2, dtype=torch.float16, device=table.device)
    kernels_for(table).hash_table_half2(table.detach(), out)
    return out


def hash_encode(encoding, x01: torch.Tensor) -> torch.Tensor:
    """Hash-grid features ``(N, L * F)`` (level-major) of points ``x01`` ``(N, 3)`` in ``[0, 1]^3`` (clamped;
    a clamped axis gets no gradient), with ``encoding`` a :class:`~instsim.nerf.encoding.HashEncoding` on a
    GPU. Differentiable in the points and the table; float32 or float64 (the table's dtype). While
    ``encoding.half_table`` holds a :func:`half_table` copy, points that need no gradient are encoded from it
    (:class:`HashEncodeHalfTable`)."""
    if encoding.half_table is not None and not x01.requires_grad:
        return HashEncodeHalfTable.apply(
            x01.float(),
            encoding.table,
            encoding.half_table,
            encoding.level_res,
            encoding.level_offsets,
            encoding.level_dense,
            encoding.log2_table,
        )
    return HashEncode.apply(
        x01.to(encoding.table.dtype),
        encoding.table,
        encoding.level_res,
        encoding.level_offsets,
        encoding.level_dense,
        encoding.log2_table,
    )


class _SHEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d):  # type: ignore[override]
        d = d.contiguous()
        ctx.save_for_backward(d)
        return kernels_for(d).sh_encode_forward(d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        (d,) = ctx.saved_tensors
        return kernels_for(d).sh_encode_backward(grad_out.contiguous(), d)


def sh_encode(d: torch.Tensor) -> torch.Tensor:
    """Degree-4 real spherical harmonics ``(N, 16)`` of unit directions ``(N, 3)``; differentiable in ``d``."""
    return _SHEncode.apply(d)


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sigma, rgb, t, starts, counts, dt: float, min_transmittance: float):  # type: ignore[override]
        sigma, rgb, t = sigma.contiguous(), rgb.contiguous(), t.contiguous()
        out_rgb, opacity, depth, n_used = kernels_for(sigma).composite_forward(
            sigma, rgb, t, starts, counts, dt, min_transmittance
        )
        ctx.save_for_backward(sigma, rgb, t, starts, n_used, out_rgb, opacity, depth)
        ctx.dt = dt
        ctx.mark_non_differentiable(n_used)
        return out_rgb, opacity, depth, n_used

    @staticmethod
    @once_differentiable
    def backward(ctx, g_rgb, g_opacity, g_depth, _g_used):  # type: ignore[override]
        sigma, rgb, t, starts, n_used, out_rgb, opacity, depth = ctx.saved_tensors
        g_rgb = torch.zeros_like(out_rgb) if g_rgb is None else g_rgb.contiguous()
        g_opacity = torch.zeros_like(opacity) if g_opacity is None else g_opacity.contiguous()
        g_depth = torch.zeros_like(depth) if g_depth is None else g_depth.contiguous()
        grad_sigma, grad_rgb = kernels_for(sigma).composite_backward(
            g_rgb, g_opacity, g_depth, sigma, rgb, t, starts, n_used, out_rgb, opacity, depth, ctx.dt
        )
        return grad_sigma, grad_rgb, None, None, None, None, None


def composite(
    sigma: torch.Tensor,
    rgb: torch.Tensor,
    t: torch.Tensor,
    starts: torch.Tensor,
    counts: torch.Tensor,
    dt: float,
    min_transmittance: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Alpha compositing of packed samples (ray ``r``'s at ``starts[r] : starts[r] + counts[r]``, in order).

    Args:
        sigma ``(M,)``, rgb ``(M, 3)``, t ``(M,)``: densities, colours, distances (one dtype);
        starts ``(R,)`` int64, counts ``(R,)`` int32; dt: the step; min_transmittance: a sample counts while
        the transmittance before it is above this (0 = every sample).

    Returns:
        ``rgb`` ``(R, 3)`` (over black), ``opacity`` ``(R,)``, ``depth`` ``(R,)`` (sum of weight * t) and
        ``n_used`` ``(R,)`` int32 (samples before termination). Differentiable in sigma and rgb.
    """
    out_rgb, opacity, depth, n_used = _Composite.apply(sigma, rgb, t, starts, counts, float(dt), float(min_transmittance))
    return {"rgb": out_rgb, "opacity": opacity, "depth": depth, "n_used": n_used}


def march_inputs(grid: OccupancyGrid, rays_o: torch.Tensor, rays_d: torch.Tensor, jitter: torch.Tensor | None):
    """The march kernels' inputs: float32 contiguous rays, jitter (0.5 when None) and box, and the occupancy as
    uint8 (a view of the grid's storage)."""
    o = rays_o.detach().float().contiguous()
    d = rays_d.detach().float().contiguous()
    u = torch.full((o.shape[0],), 0.5, device=o.device) if jitter is None else jitter.detach().float().contiguous()
    bbox = grid.bbox.float().contiguous()
    occ = grid.occupied.contiguous().view(torch.uint8)
    return o, d, u, bbox, occ


@torch.no_grad()
def march_packed(
    grid: OccupancyGrid,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    dt: float,
    *,
    jitter: torch.Tensor | None = None,
    max_samples: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sample of rays ``(R, 3)`` (NeRF units, unit directions) in occupied cells, as
    :func:`~instsim.nerf.rendering.march` chooses them: ``ray`` ``(M,)`` int64, ``t`` ``(M,)`` float32 (sorted
    by ray, then distance), ``starts`` ``(R,)`` int64 and ``counts`` ``(R,)`` int32."""
    o, d, u, bbox, occ = march_inputs(grid, rays_o, rays_d, jitter)
    ray, t, starts, counts = kernels_for(o).march_train(o, d, u, bbox, occ, grid.res, float(dt), int(max_samples))
    return ray, t, starts, counts


def _empty_result(rays_o: torch.Tensor, n_rays: int, out_dtype: torch.dtype) -> dict:
    z = rays_o.new_zeros(n_rays, dtype=out_dtype)
    # keep the graph connected to the rays so callers can always backpropagate
    z = z + 0.0 * rays_o.sum() if rays_o.requires_grad else z
    return {"rgb": z[:, None].expand(n_rays, 3).clone(), "opacity": z, "depth": z.clone(), "n_samples": 0, "n_evals": 0}


def _at_samples(rays_o: torch.Tensor, rays_d: torch.Tensor, ray: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # index_select, not rays_o[ray]: its backward is an index_add, where advanced indexing's sorts the indices
    return rays_o.index_select(0, ray) + t[:, None].to(rays_o.dtype) * rays_d.index_select(0, ray)


def render_rays_packed(
    model, rays_o: torch.Tensor, rays_d: torch.Tensor, *, jitter: torch.Tensor | None = None, prune: bool = True
) -> dict:
    """Render rays ``(R, 3)`` (NeRF units) in autograd: gradients reach the model's weights and ``rays_o`` /
    ``rays_d`` (through the sample positions ``o + t d``).

    With ``prune``, a density pass without gradient first finds where each ray terminates, and only the
    samples before that point go through the network with gradient (the rest would get zero gradient anyway).

    Returns the keys of :func:`~instsim.nerf.rendering.render_rays`: ``rgb``, ``opacity``, ``depth``,
    ``n_samples`` (composited) and ``n_evals``: with ``prune``, the samples evaluated with gradient (the
    composited ones: Instant-NGP's "compacted" samples, which its per-step sample budget counts); the
    density pass without gradient that finds them is not counted.
    """
    cfg = model.cfg
    n_rays = rays_o.shape[0]
    dt, min_t = cfg.march_dt, float(cfg.min_transmittance)
    out_dtype = torch.promote_types(rays_o.dtype, torch.float32)
    ray, t, starts, counts = march_packed(model.occupancy, rays_o, rays_d, dt, jitter=jitter, max_samples=cfg.max_samples)
    n_evals = int(ray.numel())
    if n_evals == 0:
        return _empty_result(rays_o, n_rays, out_dtype)
    if prune:
        with torch.no_grad():
            enc = model.encoding
            enc.half_table = half_table(enc)  # this pass only finds where rays stop: half precision is plenty
            try:
                sigma0 = model.density(_at_samples(rays_o.detach(), rays_d.detach(), ray, t))[0]
            finally:
                enc.half_table = None
            # colour does not change where a ray stops: composite the densities alone
            used = composite(sigma0.float(), torch.zeros(n_evals, 3, device=t.device), t, starts, counts, dt, min_t)["n_used"]
            rank = torch.arange(n_evals, device=t.device) - starts[ray]
            keep = (rank < used[ray]).nonzero().squeeze(1)
            n_kept = used.to(torch.int64)
            ray, t = ray[keep], t[keep]
            starts = torch.cumsum(n_kept, 0) - n_kept
            counts = used
        n_evals = int(ray.numel())
    tt = t.to(rays_o.dtype)
    dirs = rays_d.index_select(0, ray)
    sigma, geo = model.density(rays_o.index_select(0, ray) + tt[:, None] * dirs)
    rgb = model.color(dirs, geo)
    out = composite(sigma.to(out_dtype), rgb.to(out_dtype), tt.to(out_dtype), starts, counts, dt, min_t)
    return {
        "rgb": out["rgb"],
        "opacity": out["opacity"],
        "depth": out["depth"],
        "n_samples": int(ray.numel()),
        "n_evals": n_evals,
    }


@torch.no_grad()
def render_rays_inference(model, rays_o: torch.Tensor, rays_d: torch.Tensor, *, step_budget: int = 2**20) -> dict:
    """Render rays ``(R, 3)`` without gradient: each step marches every alive ray ``n`` more samples (``n`` =
    ``step_budget`` / alive rays, 1 to 64), evaluates the network on them, composites, and drops rays that
    became opaque or left the occupied box, so later steps give the remaining rays more samples each.
    Same samples and stopping rule as :func:`render_rays_packed` (float32). Returns its keys."""
    cfg = model.cfg
    k = kernels_for(rays_o)
    grid = model.occupancy
    n_rays = rays_o.shape[0]
    dt, min_t = cfg.march_dt, float(cfg.min_transmittance)
    o, d, u, bbox, occ = march_inputs(grid, rays_o, rays_d, None)
    k_cur, k_hi = k.march_init(o, d, u, bbox, dt)
    n_done = torch.zeros_like(k_cur)
    acc_rgb = torch.zeros(n_rays, 3, device=o.device)
    acc_opacity = torch.zeros(n_rays, device=o.device)
    acc_depth = torch.zeros(n_rays, device=o.device)
    trans = torch.ones(n_rays, device=o.device)
    alive = (k_hi >= k_cur).nonzero().squeeze(1)
    n_evals = 0
    while alive.numel():
        n_alive = alive.numel()
        n_step = max(1, min(64, step_budget // n_alive))
        t = k.march_step(o, d, u, alive, k_cur, k_hi, n_done, occ, grid.res, dt, n_step, cfg.max_samples)
        flat = (t.view(-1) >= 0).nonzero().squeeze(1)
        sigma = torch.zeros(n_alive * n_step, device=o.device)
        rgb = torch.zeros(n_alive * n_step, 3, device=o.device)
        if flat.numel():
            r = alive[flat // n_step]
            dirs = d[r]
            s, geo = model.density(o[r] + t.view(-1)[flat, None] * dirs)
            sigma[flat] = s.float()
            rgb[flat] = model.color(dirs, geo).float()
            n_evals += int(flat.numel())
        keep = k.composite_step(sigma, rgb, t, alive, dt, min_t, k_cur, k_hi, acc_rgb, acc_opacity, acc_depth, trans)
        alive = alive[keep]
    out_dtype = torch.promote_types(rays_o.dtype, torch.float32)
    return {
        "rgb": acc_rgb.to(out_dtype),
        "opacity": acc_opacity.to(out_dtype),
        "depth": acc_depth.to(out_dtype),
        "n_samples": n_evals,
        "n_evals": n_evals,
    }


def render_rays_cuda(model, rays_o: torch.Tensor, rays_d: torch.Tensor, *, jitter: torch.Tensor | None = None) -> dict:
    """The CUDA path of :func:`~instsim.nerf.rendering.render_rays`: in autograd when grad mode is on
    (training, pose gradients), else the compacting inference loop (which ignores ``jitter``: rendering uses
    the lattice offset 0.5)."""
    if torch.is_grad_enabled() or jitter is not None:
        return render_rays_packed(model, rays_o, rays_d, jitter=jitter)
    return render_rays_inference(model, rays_o, rays_d)
