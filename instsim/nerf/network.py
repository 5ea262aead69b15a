"""The Instant-NeRF network: hash-grid density MLP -> geometry feature -> SH-conditioned colour MLP.

Positions are in NeRF units (the cube ``[-1, 1]^3``, see :mod:`~instsim.nerf.normalization`); densities are
per NeRF unit length. The model also owns its :class:`~instsim.nerf.normalization.SceneNormalization` and
:class:`~instsim.nerf.occupancy.OccupancyGrid`, so :func:`~instsim.nerf.rendering.render` needs nothing else.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..backend import uses_cuda
from .config import NerfConfig
from .cuda_ops import sh_encode as sh_encode_cuda
from .encoding import SH_DIM, HashEncoding, sh_encode
from .normalization import SceneNormalization
from .occupancy import OccupancyGrid

__all__ = ["InstantNerf", "trunc_exp", "mlp"]


class _TruncExp(torch.autograd.Function):
    """``exp(x)`` whose gradient uses ``exp(min(x, 15))``: the density activation of Instant-NGP. Plain exp
    lets one large logit blow the gradient up early in training."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 autocast outputs -> float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    """Truncated exponential (see :class:`_TruncExp`)."""
    return _TruncExp.apply(x)


def mlp(n_in: int, n_hidden: int, n_layers: int, n_out: int) -> nn.Sequential:
    """``n_layers`` hidden ReLU layers of width ``n_hidden``, linear output (no bias: like tcnn's fused MLP)."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, n_hidden, bias=False), nn.ReLU(inplace=True)]
        width = n_hidden
    layers.append(nn.Linear(width, n_out, bias=False))
    return nn.Sequential(*layers)


class InstantNerf(nn.Module):
    """Instant-NGP's NeRF: density and colour at NeRF-unit positions.

    Args:
        cfg: the construction config (``max_res`` must be resolved to a number, see
            :func:`~instsim.nerf.config.resolve_max_res`).
        normalization: world -> NeRF units; kept with the model and in its checkpoint.
    """

    def __init__(self, cfg: NerfConfig, normalization: SceneNormalization) -> None:
        super().__init__()
        if cfg.max_res == "auto":
            raise ValueError("InstantNerf needs a resolved max_res; use resolve_max_res(cfg, intrinsics_info)")
        self.cfg = cfg
        self.normalization = normalization
        self.encoding = HashEncoding(cfg.n_levels, cfg.n_features, cfg.log2_table, cfg.base_res, int(cfg.max_res))
        self.encoding.backend = cfg.backend
        # the density logit is the first output; all 1 + geo_feat_dim outputs feed the colour MLP
        self.density_net = mlp(self.encoding.out_dim, cfg.hidden_dim, cfg.density_layers, 1 + cfg.geo_feat_dim)
        self.color_net = mlp(SH_DIM + 1 + cfg.geo_feat_dim, cfg.hidden_dim, cfg.color_layers, 3)
        self.occupancy = OccupancyGrid(cfg.grid_res)

    @property
    def uses_cuda_kernels(self) -> bool:
        """Whether this model runs the CUDA kernels (``cfg.backend`` and where the model is, see
        :mod:`instsim.backend`)."""
        return uses_cuda(self.cfg.backend, self.encoding.table.device)

    @property
    def autocast_enabled(self) -> bool:
        return bool(self.cfg.mixed_precision) and self.encoding.table.device.type == "cuda"

    def _autocast(self):
        # bf16 needs no loss scaling; only the MLPs run in it (the table and compositing stay fp32). No weight-cast
        # cache: each region uses each weight once, and a cache would break capture as a CUDA graph
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_enabled, cache_enabled=False)

    def density(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density ``(N,)`` (per NeRF unit) and geometry feature ``(N, 1 + geo_feat_dim)`` at NeRF-unit
        positions ``x`` ``(N, 3)``. Differentiable in ``x`` and the weights."""
        feats = self.encoding((x + 1.0) * 0.5)
        with self._autocast():
            h = self.density_net(feats)
        h = _upcast(h)
        return trunc_exp(h[:, 0]), h

    def color(self, d: torch.Tensor, geo: torch.Tensor) -> torch.Tensor:
        """RGB ``(N, 3)`` in [0, 1] from unit directions ``d`` ``(N, 3)`` and geometry features."""
        if self.uses_cuda_kernels:
            sh = sh_encode_cuda(d.to(geo.dtype))
        else:
            sh = sh_encode(d)
        with self._autocast():
            rgb = self.color_net(torch.cat([sh.to(geo.dtype), geo], dim=-1))
        return torch.sigmoid(_upcast(rgb))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sigma`` ``(N,)`` and ``rgb`` ``(N, 3)`` at NeRF-unit positions ``x`` ``(N, 3)`` seen along unit
        directions ``d`` ``(N, 3)``."""
        sigma, geo = self.density(x)
        return sigma, self.color(d, geo)

    def construction(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this model: config and normalization dicts."""
        return {"config": self.cfg.to_dict(), "normalization": self.normalization.to_dict()}

    @classmethod
    def build(cls, config: Mapping[str, Any], normalization: Mapping[str, Any]) -> "InstantNerf":
        return cls(NerfConfig.from_dict(config), SceneNormalization.from_dict(normalization))
