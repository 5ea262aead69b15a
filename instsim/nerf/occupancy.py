"""Occupancy grid over the NeRF cube: which cells can hold density, so ray marching skips the rest.

A ``G^3`` grid over ``[-1, 1]^3`` (NeRF units) stores a running estimate of the largest density in each cell.
Every update evaluates the network at one random point in each chosen cell and keeps
``max(decay * old, new)`` (Instant-NGP's EMA). A cell is occupied when its value exceeds
``min(sigma_threshold, mean of the grid)``; the mean term keeps the grid from emptying while the network
is still uniformly foggy.

Why the decay is a setting: the old density of a cell only fades through ``decay``; Instant-NGP's 0.95 per
update needs ~90 updates to forget an initial density 100x too high, which is more updates than a short
CPU run makes, so the grid never prunes. The CPU preset uses a fast decay (0.6) instead.

The grid starts fully occupied with zero stored density (an "empty start": nothing is remembered from the
random initial network) and marks cells from the first update on.

Cell ``(i, j, k)`` covers ``[-1 + 2 i / G, -1 + 2 (i + 1) / G)`` along x (and likewise y, z); its flat index
is ``(i * G + j) * G + k``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OccupancyGrid", "COARSE_RES", "device_rand"]

#: the coarse (max-pooled, dilated) grid used to skip long empty stretches of a ray in big steps
COARSE_RES = 16


def device_rand(generator: torch.Generator | None, device: torch.device) -> Callable[..., torch.Tensor]:
    """``rand(*shape)``: uniform [0, 1) numbers on ``device``, reproducible from the CPU ``generator``.

    On the CPU it draws from ``generator`` itself. On a GPU it draws on the GPU from a generator seeded by
    one draw of ``generator``: drawing millions of numbers on the CPU and copying them over cost more than
    the training step they served (the CPU generator's state, saved with checkpoints, still fixes them).
    """
    if device.type != "cuda":
        return lambda *shape: torch.rand(*shape, generator=generator)
    gpu_gen = torch.Generator(device=device)
    if generator is None:
        gpu_gen.seed()
    else:
        gpu_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return lambda *shape: torch.rand(*shape, generator=gpu_gen, device=device)


class OccupancyGrid(nn.Module):
    """Occupancy of ``res^3`` cells over the NeRF cube ``[-1, 1]^3``.

    Buffers (all saved with the model): ``density`` ``(res^3,)`` float32 (per NeRF unit), ``occupied``
    ``(res^3,)`` bool, ``n_updates`` () int64. Derived (not saved; rebuilt by :meth:`refresh`): ``coarse``
    ``(Gc^3,)`` bool (dilated max-pool of ``occupied``), ``bbox`` ``(2, 3)`` (NeRF-unit box of occupied cells).
    """

    def __init__(self, res: int) -> None:
        super().__init__()
        self.res = int(res)
        self.register_buffer("density", torch.zeros(self.res**3))
        self.register_buffer("occupied", torch.ones(self.res**3, dtype=torch.bool))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.int64))
        # coarse grid: factor c cells per coarse cell; a coarse res that divides res
        c = max(1, self.res // COARSE_RES)
        while self.res % c:
            c -= 1
        self.coarse_factor = c
        self.coarse_res = self.res // c
        self.register_buffer("coarse", torch.ones(self.coarse_res**3, dtype=torch.bool), persistent=False)
        self.register_buffer("bbox", torch.tensor([[-1.0] * 3, [1.0] * 3]), persistent=False)

    # ------------------------------------------------------------------ queries
    @property
    def cell_size(self) -> float:
        """Side of a fine cell in NeRF units."""
        return 2.0 / self.res

    @property
    def coarse_cell_size(self) -> float:
        return 2.0 / self.coarse_res

    @staticmethod
    def _flat(x: torch.Tensor, res: int) -> torch.Tensor:
        ijk = ((x + 1.0) * (0.5 * res)).floor().long().clamp_(0, res - 1)
        return (ijk[..., 0] * res + ijk[..., 1]) * res + ijk[..., 2]

    def cell_index(self, x: torch.Tensor) -> torch.Tensor:
        """Flat cell index ``(...,)`` of NeRF-unit points ``x`` ``(..., 3)`` (clamped onto the grid)."""
        return self._flat(x, self.res)

    def is_occupied(self, x: torch.Tensor) -> torch.Tensor:
        """Occupancy ``(...,)`` bool at points ``x`` ``(..., 3)``; points outside the cube are empty."""
        inside = (x.abs() <= 1.0).all(-1)
        return self.occupied[self.cell_index(x)] & inside

    def is_occupied_coarse(self, x: torch.Tensor) -> torch.Tensor:
        """Conservative occupancy at ``x``: true if any fine cell in the coarse cell or its 26 neighbours is
        occupied. A ray segment no longer than a coarse cell that starts at ``x`` can only meet occupied
        cells if this is true."""
        return self.coarse[self._flat(x, self.coarse_res)]

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())

    def cell_centres(self, cells: torch.Tensor) -> torch.Tensor:
        """NeRF-unit centres ``(n, 3)`` of flat cell indices ``cells`` ``(n,)``."""
        g = self.res
        ijk = torch.stack([cells // (g * g), (cells // g) % g, cells % g], dim=-1).to(self.density.dtype)
        return -1.0 + (ijk + 0.5) * self.cell_size

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the derived coarse grid and occupied bounding box from ``occupied`` (after loading)."""
        g, c, gc = self.res, self.coarse_factor, self.coarse_res
        occ = self.occupied.view(1, 1, g, g, g).float()
        coarse = F.max_pool3d(occ, kernel_size=c, stride=c) if c > 1 else occ
        coarse = F.max_pool3d(coarse, kernel_size=3, stride=1, padding=1)
        # every buffer is updated in place: a captured CUDA graph (instsim.nerf.cuda_train) reads them by address
        self.coarse.copy_(coarse.view(gc**3) > 0)
        cells = self.occupied.view(g, g, g).nonzero()
        if cells.numel() == 0:
            # nothing occupied: an empty box (lo > hi), so every ray misses it
            self.bbox.copy_(torch.tensor([[1.0] * 3, [-1.0] * 3]))
        else:
            lo = cells.min(0).values.to(self.density.dtype) * self.cell_size - 1.0
            hi = (cells.max(0).values + 1).to(self.density.dtype) * self.cell_size - 1.0
            self.bbox.copy_(torch.stack([lo, hi]))

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    @torch.no_grad()
    def update(
        self,
        density_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        decay: float,
        sigma_threshold: float,
        sample_fraction: float,
        generator: torch.Generator | None = None,
        full: bool = False,
        chunk: int = 2**16,
    ) -> None:
        """Re-estimate cell densities and occupancy.

        Args:
            density_fn: NeRF-unit points ``(n, 3)`` -> densities ``(n,)`` (called without gradient).
            decay: EMA factor, ``density = max(decay * density, new)`` on the evaluated cells.
            sigma_threshold: density above which a cell is occupied (see the module docstring).
            sample_fraction: fraction of the unoccupied cells evaluated; every occupied cell is evaluated,
                so nothing occupied goes stale.
            generator: for the cell choice and the jitter inside each cell (CPU generator).
            full: evaluate every cell (the first update).
            chunk: points per ``density_fn`` call.
        """
        dev = self.density.device
        n = self.res**3
        rand = device_rand(generator, dev)
        if full or sample_fraction >= 1.0:
            cells = torch.arange(n, device=dev)
        else:
            occ = self.occupied.nonzero().squeeze(1)
            pick = rand(n) < sample_fraction
            free = (pick & ~self.occupied).nonzero().squeeze(1)
            cells = torch.cat([occ, free])
        jitter = (rand(cells.shape[0], 3) - 0.5) * self.cell_size
        pts = self.cell_centres(cells) + jitter
        new = torch.cat([density_fn(p).float() for p in pts.split(chunk)]) if cells.numel() else pts.new_zeros(0)
        self.density[cells] = torch.maximum(self.density[cells] * decay, torch.nan_to_num(new, nan=0.0))
        thr = min(float(sigma_threshold), float(self.density.mean()))
        self.occupied.copy_(self.density > thr)
        self.n_updates += 1
        self.refresh()
