"""Input encodings of Instant-NeRF: the multiresolution hash grid and spherical harmonics (pure PyTorch).

Hash grid (Mueller et al. 2022, sec. 3): level ``l`` of ``L`` has ``N_l = floor(N_min * b^l)`` cells per side
with ``b = exp((ln N_max - ln N_min) / (L - 1))``. A point in ``[0, 1]^3`` is scaled to ``x * N_l``; its cell's
8 corners each index an ``F``-wide feature vector and the features are blended trilinearly. A level whose
``(N_l + 1)^3`` vertices fit in the table (``T`` entries) is indexed densely (one entry per vertex, no
collisions); finer levels use the spatial hash ``(x * 1) xor (y * 2654435761) xor (z * 805459861) mod T``.

Speed: the lookup and blend are one custom autograd function (:class:`HashInterp`): it gathers with
``index_select``, blends with three nested ``lerp`` s and scatters the table gradient with ``index_add_``
(autograd through ``table[idx]`` was 3-10x slower on CPU in the prototype). Its backward also gives the
gradient with respect to the cell coordinates, which ordinary autograd carries on to the input positions
(first order only; Neural-Sim needs no second derivatives through the NeRF). Arrays are laid out
``(level, corner, point)`` so every elementwise op runs over long contiguous vectors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backend import uses_cuda
from .cuda_ops import hash_encode

__all__ = ["HashEncoding", "HashInterp", "level_resolutions", "sh_encode", "SH_DIM", "HASH_PRIMES"]

#: tcnn / Instant-NGP primes; the first is 1 for cache coherence along x.
HASH_PRIMES = (1, 2654435761, 805459861)
#: coefficients of the degree-4 (4 bands, l = 0..3) real spherical harmonics
SH_DIM = 16


def level_resolutions(n_levels: int, base_res: int, max_res: int) -> list[int]:
    """Cells per side of each level: ``floor(N_min * b^l)``, ``b`` the paper's growth factor."""
    if n_levels == 1:
        return [int(base_res)]
    b = math.exp((math.log(max_res) - math.log(base_res)) / (n_levels - 1))
    # the small epsilon keeps exact powers (e.g. N_max itself) from flooring one below by rounding error
    return [int(math.floor(base_res * b**lvl + 1e-6)) for lvl in range(n_levels)]


def _lerp3(g: torch.Tensor, frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trilinear blend of corner values ``g`` ``(L, 2, 2, 2, N)`` (axes x, y, z) at ``frac`` ``(3, L, N)``, as
    three nested lerps (z, then y, then x): 7 fused ops per point instead of building 8 weights.
    Returns the blend ``(L, N)`` and the intermediate z- and y-blends (for the position gradient)."""
    gz = torch.lerp(g[:, :, :, 0], g[:, :, :, 1], frac[2][:, None, None, :])  # (L, 2, 2, N)
    gy = torch.lerp(gz[:, :, 0], gz[:, :, 1], frac[1][:, None, :])  # (L, 2, N)
    return torch.lerp(gy[:, 0], gy[:, 1], frac[0]), gz, gy


class HashInterp(torch.autograd.Function):
    """``out[f, l, n]``: feature ``f`` of level ``l`` at point ``n``, trilinearly blended from the 8 table
    entries ``idx[l, :, n]`` with cell coordinates ``frac[:, l, n]`` in [0, 1].

    Shapes: table ``(F, S)``, idx ``(L, 8, N)`` int64 (corner ``c = 4a + 2b + d`` is vertex offset
    ``(a, b, d)``), frac ``(3, L, N)`` -> out ``(F, L, N)``. Points are the innermost (contiguous) dimension so
    every elementwise op runs over long vectors; with the 8 corners or F features innermost torch's CPU
    kernels crawl through tiny strided loops.

    Backward: the table gradient is one 1-D ``index_add_`` per feature (a scatter of the trilinear weights
    times the output gradient); the position gradient (only when ``frac`` needs one) re-gathers the table
    rather than keeping the ``(F, L, 8, N)`` gather alive between passes.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n_lv, _, n = idx.shape
        flat_idx = idx.view(-1)
        frac = frac.to(table.dtype)
        out = torch.stack([_lerp3(row.index_select(0, flat_idx).view(n_lv, 2, 2, 2, n), frac)[0] for row in table])
        ctx.save_for_backward(table, idx, frac)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        table, idx, frac = ctx.saved_tensors
        n_lv, _, n = idx.shape
        grad_table = grad_frac = None
        grad_out = grad_out.to(table.dtype)
        flat_idx = idx.view(-1)
        if ctx.needs_input_grad[0]:
            one_m = 1.0 - frac
            wy = torch.stack([one_m[1], frac[1]], dim=1)[:, None, :, None, :]  # (L, 1, 2, 1, N)
            wz = torch.stack([one_m[2], frac[2]], dim=1)[:, None, None, :, :]  # (L, 1, 1, 2, N)
            wyz = wy * wz  # (L, 1, 2, 2, N)
            grad_table = torch.zeros_like(table)
            for f in range(table.shape[0]):
                gx = torch.stack([grad_out[f] * one_m[0], grad_out[f] * frac[0]], dim=1)  # (L, 2, N)
                vals = gx[:, :, None, None, :] * wyz  # (L, 2, 2, 2, N)
                grad_table[f].index_add_(0, flat_idx, vals.view(-1))
        if ctx.needs_input_grad[2]:
            grad_frac = torch.zeros_like(frac)
            for f, row in enumerate(table):
                g = row.index_select(0, flat_idx).view(n_lv, 2, 2, 2, n)
                _, gz, gy = _lerp3(g, frac)
                go = grad_out[f]
                grad_frac[0] += go * (gy[:, 1] - gy[:, 0])
                grad_frac[1] += go * torch.lerp(gz[:, 0, 1] - gz[:, 0, 0], gz[:, 1, 1] - gz[:, 1, 0], frac[0])
                dz = g[:, :, :, 1] - g[:, :, :, 0]  # (L, 2, 2, N)
                dzy = torch.lerp(dz[:, :, 0], dz[:, :, 1], frac[1][:, None, :])  # (L, 2, N)
                grad_frac[2] += go * torch.lerp(dzy[:, 0], dzy[:, 1], frac[0])
        return grad_table, None, grad_frac


class HashEncoding(nn.Module):
    """Multiresolution hash encoding: points ``(N, 3)`` in ``[0, 1]^3`` -> features ``(N, L * F)``.

    Args:
        n_levels: L. n_features: F. log2_table: log2(T), entries per (hashed) level.
        base_res: N_min. max_res: N_max (cells per side of the unit cube).
        init_scale: table entries start uniform in ``[-init_scale, init_scale]`` (the paper's 1e-4).

    The table of all levels is one parameter ``table`` ``(F, sum of level sizes)``; level ``l`` occupies
    columns ``offsets[l] : offsets[l + 1]``. Points outside the unit cube are clamped onto it (their position
    gradient is then zero).
    """

    def __init__(
        self, n_levels: int, n_features: int, log2_table: int, base_res: int, max_res: int, init_scale: float = 1e-4
    ) -> None:
        super().__init__()
        self.n_levels, self.n_features, self.log2_table = n_levels, n_features, log2_table
        self.resolutions = level_resolutions(n_levels, base_res, max_res)
        t = 2**log2_table
        sizes, dense = [], []
        for r in self.resolutions:
            n_vert = (r + 1) ** 3
            dense.append(n_vert <= t)
            sizes.append(n_vert if n_vert <= t else t)
        self.dense = dense
        self.sizes = sizes
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.offsets = offsets
        # (F, S): one contiguous row per feature, gathered with 1-D index_select
        self.table = nn.Parameter(torch.empty(n_features, offsets[-1]).uniform_(-init_scale, init_scale))
        # dense levels come first (resolutions increase), so the levels split into two contiguous groups
        self.n_dense = sum(dense)
        self.register_buffer("res", torch.tensor(self.resolutions, dtype=torch.float32), persistent=False)
        # dense levels: flat index = base + corner offset, base = ix + iy * V + iz * V^2 (V = N_l + 1 vertices)
        verts = torch.tensor([r + 1 for r in self.resolutions[: self.n_dense]], dtype=torch.int64)
        strides = torch.stack([torch.ones_like(verts), verts, verts * verts], dim=-1)  # (Ld, 3)
        corners = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.int64)
        dense_corner = (corners[None, :, :] * strides[:, None, :]).sum(-1)  # (Ld, 8)
        dense_corner += torch.tensor(self.offsets[: self.n_dense], dtype=torch.int64)[:, None]
        self.register_buffer("dense_strides", strides, persistent=False)
        self.register_buffer("dense_corner", dense_corner, persistent=False)
        self.register_buffer(
            "hash_offsets", torch.tensor(self.offsets[self.n_dense : n_levels], dtype=torch.int64), persistent=False
        )
        # per-level tables of the CUDA kernels (instsim.nerf.cuda_ops.hash_encode)
        self.register_buffer("level_res", torch.tensor(self.resolutions, dtype=torch.int32), persistent=False)
        self.register_buffer("level_offsets", torch.tensor(self.offsets[:n_levels], dtype=torch.int64), persistent=False)
        self.register_buffer("level_dense", torch.tensor(dense, dtype=torch.uint8), persistent=False)
        #: ``nerf.backend`` (set by the model): on a GPU, ``auto``/``cuda`` run the CUDA kernel
        self.backend = "torch"
        #: a half-precision copy of the table that the CUDA path encodes gradient-free points from while it is set
        #: (:func:`instsim.nerf.cuda_ops.half_table`); None otherwise
        self.half_table: torch.Tensor | None = None

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features

    def corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corner entries ``(L, 8, N)`` int64 into the table and cell coordinates ``frac`` ``(3, L, N)`` in
        [0, 1] (differentiable in ``x``) for points ``x`` ``(N, 3)``.

        Corner ``c = 4a + 2b + d`` is vertex ``(i + a, j + b, k + d)`` of the point's cell ``(i, j, k)``. Each
        level's lookups hit one contiguous part of the table (cache locality).
        """
        n_lv, nd = self.n_levels, self.n_dense
        n = x.shape[0]
        res = self.res.to(x.dtype)[:, None]
        idx = torch.empty(n_lv, 8, n, dtype=torch.int64, device=x.device)
        i0s, fracs = [], []
        for axis in range(3):
            pos = res * x[:, axis][None, :]  # (L, N)
            # floor without gradient; clamp so the +1 corner stays inside the level (x == 1 gives frac == 1)
            i0 = torch.minimum(pos.detach().floor(), res - 1).clamp_(min=0)
            fracs.append(pos - i0)  # differentiable in x
            i0s.append(i0.long())
        if nd:
            s = self.dense_strides
            base = i0s[0][:nd] + i0s[1][:nd] * s[:, 1:2] + i0s[2][:nd] * s[:, 2:3]  # (Ld, N)
            torch.add(base[:, None, :], self.dense_corner[:, :, None], out=idx[:nd])
        if nd < n_lv:
            hs = []
            for axis in range(3):
                h0 = i0s[axis][nd:] * HASH_PRIMES[axis]
                hs.append(torch.stack([h0, h0 + HASH_PRIMES[axis]], dim=1))  # (Lh, 2, N)
            hxy = hs[0][:, :, None, :] ^ hs[1][:, None, :, :]  # (Lh, 2, 2, N)
            h = (hxy[:, :, :, None, :] ^ hs[2][:, None, None, :, :]).view(n_lv - nd, 8, n)
            torch.bitwise_and(h, 2**self.log2_table - 1, out=idx[nd:])
            idx[nd:] += self.hash_offsets[:, None, None]
        return idx, torch.stack(fracs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, 3)`` in ``[0, 1]`` -> ``(N, L * F)`` in the table's dtype, ordered level-major
        (level ``l``'s features at columns ``l * F : (l + 1) * F``)."""
        if uses_cuda(self.backend, self.table.device):
            return hash_encode(self, x)
        x = x.to(self.table.dtype).clamp(0.0, 1.0)
        idx, frac = self.corners(x)
        out = HashInterp.apply(self.table, idx, frac)  # (F, L, N)
        return out.permute(2, 1, 0).reshape(x.shape[0], self.n_levels * self.n_features)

    def extra_repr(self) -> str:
        return (
            f"levels={self.n_levels}, features={self.n_features}, T=2^{self.log2_table}, "
            f"resolutions={self.resolutions}, dense_levels={self.n_dense}, params={self.table.numel()}"
        )


def sh_encode(d: torch.Tensor, degree: int = 4) -> torch.Tensor:
    """Real spherical harmonics of unit directions ``d`` ``(N, 3)``: ``(N, degree^2)`` (degree 4 -> 16, the
    Instant-NGP direction encoding; same constants and sign convention as tcnn). Differentiable in ``d``."""
    if not 1 <= degree <= 4:
        raise ValueError(f"SH degree must be in 1..4, got {degree}")
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        out += [-0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x]
    if degree > 2:
        xy, xz, yz, x2, y2, z2 = x * y, x * z, y * z, x * x, y * y, z * z
        out += [
            1.0925484305920792 * xy,
            -1.0925484305920792 * yz,
            0.94617469575755997 * z2 - 0.31539156525251999,
            -1.0925484305920792 * xz,
            0.54627421529603959 * (x2 - y2),
        ]
    if degree > 3:
        out += [
            0.59004358992664352 * y * (-3.0 * x2 + y2),
            2.8906114426405538 * xy * z,
            0.45704579946446572 * y * (1.0 - 5.0 * z2),
            0.3731763325901154 * z * (5.0 * z2 - 3.0),
            0.45704579946446572 * x * (1.0 - 5.0 * z2),
            1.4453057213202769 * z * (x2 - y2),
            0.59004358992664352 * x * (-x2 + 3.0 * y2),
        ]
    return torch.stack(out, dim=-1)
