"""Input encodings of Instant-NeRF: the multiresolution hash grid and spherical harmonics (pure PyTorch).

Hash grid (Mueller et al. 2022, sec. 3): level ``l`` of ``L`` has ``N_l = floor(N_min * b^l)`` cells per side
with ``b = exp((ln N_max - ln N_min) / (L - 1))``. A point in ``[0, 1]^3`` is scaled to ``x * N_l``; its cell's
8 corners each index an ``F``-wide feature vector and the features are blended trilinearly. A level whose
``(N_l + 1)^3`` vertices fit in the table (``T`` entries) is indexed densely (one entry per vertex, no
collisions); finer levels use the spatial hash ``(x * 1) xor (y * 2654435761) xor (z * 805459861) mod T``.

Speed: the table lookup is a custom autograd function (:class:`_HashInterp`) that gathers with
``index_select`` and scatters the table gradient with ``index_add_``. Autograd through ``table[idx]`` is
3-10x slower on CPU (it materializes and sorts a huge index for the backward). The trilinear weights stay
in ordinary autograd so gradients flow to the input positions (first order only; Neural-Sim needs no
second derivatives through the NeRF).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["HashEncoding", "level_resolutions", "sh_encode", "SH_DIM", "HASH_PRIMES"]

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


class _HashInterp(torch.autograd.Function):
    """``out[p] = sum_c w[p, c] * table[idx[p, c]]``: table ``(S, F)``, idx ``(P, 8)`` int64, w ``(P, 8)`` -> ``(P, F)``.

    Backward: the table gradient is one ``index_add_`` (a scatter of ``w * grad``), the weight gradient
    re-gathers the table instead of keeping the ``(P, 8, F)`` gather alive between passes (memory).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        feats = table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])  # (P, 8, F)
        out = torch.bmm(w.to(feats.dtype).unsqueeze(1), feats).squeeze(1)  # (P, F)
        ctx.save_for_backward(table, idx, w)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        table, idx, w = ctx.saved_tensors
        grad_table = grad_w = None
        grad_out = grad_out.to(table.dtype)
        if ctx.needs_input_grad[0]:
            vals = (w.to(table.dtype).unsqueeze(-1) * grad_out.unsqueeze(1)).reshape(-1, table.shape[1])
            grad_table = torch.zeros_like(table).index_add_(0, idx.reshape(-1), vals)
        if ctx.needs_input_grad[2]:
            feats = table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])
            grad_w = torch.bmm(feats, grad_out.unsqueeze(-1)).squeeze(-1).to(w.dtype)  # (P, 8)
        return grad_table, None, grad_w


class HashEncoding(nn.Module):
    """Multiresolution hash encoding: points ``(N, 3)`` in ``[0, 1]^3`` -> features ``(N, L * F)``.

    Args:
        n_levels: L. n_features: F. log2_table: log2(T), entries per (hashed) level.
        base_res: N_min. max_res: N_max (cells per side of the unit cube).
        init_scale: table entries start uniform in ``[-init_scale, init_scale]`` (the paper's 1e-4).

    The table of all levels is one parameter ``table`` ``(sum of level sizes, F)``; level ``l`` occupies rows
    ``offsets[l] : offsets[l + 1]``. Points outside the unit cube are clamped onto it (their position
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
        self.table = nn.Parameter(torch.empty(offsets[-1], n_features).uniform_(-init_scale, init_scale))
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

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features

    def indices_and_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corner rows ``(L, N, 8)`` int64 into ``table`` and trilinear weights ``(L, N, 8)`` for ``x`` ``(N, 3)``.

        Level-major, so each level's lookups hit one contiguous part of the table (cache locality) and the
        dense and hashed groups are contiguous slices. Corner ``c = 4a + 2b + d`` is ``(x + a, y + b, z + d)``.
        """
        n_lv, nd = self.n_levels, self.n_dense
        res = self.res.to(x.dtype)
        pos = x[None, :, :] * res[:, None, None]  # (L, N, 3)
        # floor without gradient; clamp so the +1 corner stays inside the level (x == 1 lands on frac == 1)
        i0 = torch.minimum(pos.detach().floor(), (res - 1)[:, None, None]).clamp_(min=0)
        frac = pos - i0  # (L, N, 3), differentiable in x
        i0 = i0.long()
        idx = torch.empty(n_lv, x.shape[0], 8, dtype=torch.int64, device=x.device)
        if nd:
            base = (i0[:nd] * self.dense_strides[:, None, :]).sum(-1)  # (Ld, N)
            torch.add(base[:, :, None], self.dense_corner[:, None, :], out=idx[:nd])
        if nd < n_lv:
            ih = i0[nd:]
            step = torch.tensor([0, 1], dtype=torch.int64, device=x.device)
            hx = (ih[..., 0:1] + step) * HASH_PRIMES[0]  # (Lh, N, 2)
            hy = (ih[..., 1:2] + step) * HASH_PRIMES[1]
            hz = (ih[..., 2:3] + step) * HASH_PRIMES[2]
            h = hx[..., :, None, None] ^ hy[..., None, :, None] ^ hz[..., None, None, :]
            torch.bitwise_and(h.reshape(n_lv - nd, -1, 8), 2**self.log2_table - 1, out=idx[nd:])
            idx[nd:] += self.hash_offsets[:, None, None]
        one_m = 1 - frac
        wx = torch.stack([one_m[..., 0], frac[..., 0]], dim=-1)  # (L, N, 2)
        wy = torch.stack([one_m[..., 1], frac[..., 1]], dim=-1)
        wz = torch.stack([one_m[..., 2], frac[..., 2]], dim=-1)
        w = (wx[..., :, None] * wy[..., None, :]).reshape(*wx.shape[:2], 4)
        w = (w[..., :, None] * wz[..., None, :]).reshape(*wx.shape[:2], 8)
        return idx, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, 3)`` in ``[0, 1]`` -> ``(N, L * F)`` in the table's dtype, ordered level-major."""
        x = x.to(self.table.dtype).clamp(0.0, 1.0)
        idx, w = self.indices_and_weights(x)
        out = _HashInterp.apply(self.table, idx.view(-1, 8), w.reshape(-1, 8))  # (L * N, F)
        return out.view(self.n_levels, x.shape[0], self.n_features).transpose(0, 1).reshape(x.shape[0], -1)

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
