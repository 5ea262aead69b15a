"""The training step on the CUDA kernels: fixed-size sample buffers, no host sync, replayed as a CUDA graph.

The eager CUDA step (:func:`~instsim.nerf.cuda_ops.render_rays_packed` inside :func:`~instsim.nerf.train.train_nerf`)
spends most of its ~9 ms in the host: two syncs size the packed march and the pruned samples, the loss is read
every step, and some 300 small kernels and autograd nodes are launched one by one. This step does what
Instant-NGP does instead:

* the rays of a step are drawn for ``batch_rays`` slots; the first ``n_active`` (a device scalar, adapted on the
  device from the running samples-per-ray estimate, the rule of the eager step) take part;
* :func:`march_fixed` writes each active ray's samples into a buffer of fixed capacity ``M1`` (one atomic per
  ray reserves its slots), a density pass without gradient runs over the whole buffer, and
  :func:`compact_samples` copies each ray's samples before its termination point into a second buffer of
  capacity ``M2``, the only samples that go through the network with gradient. A ray that does not fit is
  dropped from the step's loss (counted, and the buffers grow at the next read-back);
* every shape is static, so forward, backward and the optimizer step are captured once as a CUDA graph and
  replayed; only the batch's random numbers, the learning rate and the graph launch go through the host;
* the counters (samples asked for, the running estimate, the loss's finiteness) stay on the device and are
  read back every :data:`READBACK_EVERY` steps and when training logs or checkpoints.

``M2`` is ``batch_samples`` when the step has a sample budget (Instant-NGP's fixed compacted batch), else
sized from the counters; ``M1`` is always sized from them (:func:`buffer_capacity`). A new size means new buffers
and a new capture (a handful per run, in the first few hundred steps).

Set ``INSTSIM_CUDA_GRAPHS=0`` to run the same static step eagerly (for debugging; slower, same numbers up to
the order of floating-point atomics).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..cameras import Intrinsics, get_rays
from ..errors import InstsimError
from .config import NerfConfig
from .cuda_ops import composite, half_table, kernels_for
from .network import InstantNerf
from .normalization import SceneNormalization

__all__ = ["BUFFER_QUANTUM", "CudaTrainStep", "MIN_RAYS", "NonFiniteLoss", "READBACK_EVERY", "buffer_capacity", "graphs_enabled"]

#: steps between reads of the device counters (Instant-NGP reads its counters every 16 steps)
READBACK_EVERY = 16
#: sample buffers grow in steps of this many slots (fewer distinct sizes, so fewer captures)
BUFFER_QUANTUM = 2**14
#: head room of a buffer sized from the counters, and how empty it may get before it shrinks
_HEADROOM, _SHRINK_BELOW = 1.25, 0.5
#: random numbers per ray slot: image, pixel x, pixel y, lattice jitter, background r, g, b
_RAND_PER_RAY = 7
#: the smallest batch the rays per step adapt down to (the rule of the eager step)
MIN_RAYS = 64


def graphs_enabled() -> bool:
    """Whether the step is captured as a CUDA graph (``INSTSIM_CUDA_GRAPHS``, default on)."""
    return os.environ.get("INSTSIM_CUDA_GRAPHS", "1") not in ("0", "false", "no", "off")


def buffer_capacity(need: int, current: int) -> int:
    """Buffer slots for ``need`` samples: the current capacity while it fits and is not far too large, else
    ``need`` with head room, rounded up to :data:`BUFFER_QUANTUM`."""
    if current >= need and need >= _SHRINK_BELOW * current / _HEADROOM:
        return current
    return max(BUFFER_QUANTUM, int(math.ceil(need * _HEADROOM / BUFFER_QUANTUM)) * BUFFER_QUANTUM)


@dataclass
class _Buffers:
    """The step's sample buffers for capacities ``m1`` (marched) and ``m2`` (compacted), ``R`` ray slots."""

    m1: int
    m2: int
    ray1: torch.Tensor  # (m1,) int64 ray of each marched sample (stale past the count: a valid ray index)
    t1: torch.Tensor  # (m1,) float32 distance
    starts1: torch.Tensor  # (R,) int64
    counts1: torch.Tensor  # (R,) int32
    ray2: torch.Tensor  # (m2,) int64
    t2: torch.Tensor  # (m2,) float32
    starts2: torch.Tensor  # (R,) int64
    counts2: torch.Tensor  # (R,) int32
    dropped: torch.Tensor  # (R,) uint8: the ray did not fit a buffer this step
    total1: torch.Tensor  # () int32 slots asked for in buffer 1
    total2: torch.Tensor  # () int32 slots asked for in buffer 2

    @classmethod
    def make(cls, m1: int, m2: int, n_rays: int, device: torch.device) -> "_Buffers":
        # zero-filled: slots past this step's count still hold a valid ray index and a finite distance, so the
        # static-shape network passes over them are harmless (nothing reads their results)
        def z(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, device=device)

        return cls(
            m1, m2, z(m1, torch.int64), z(m1, torch.float32), z(n_rays, torch.int64), z(n_rays, torch.int32),
            z(m2, torch.int64), z(m2, torch.float32), z(n_rays, torch.int64), z(n_rays, torch.int32),
            z(n_rays, torch.uint8), z(1, torch.int32), z(1, torch.int32),
        )


class CudaTrainStep:
    """One training step of ``model`` on the CUDA kernels, see the module docstring.

    Args:
        model: an :class:`InstantNerf` whose ``uses_cuda_kernels`` is true.
        opt: its Adam, built with ``fused=True, capturable=True`` and one shared CUDA tensor as every group's
            ``lr`` (see :func:`~instsim.nerf.train.make_optimizer`).
        cfg: the training config; images ``(N, H, W, 4)`` straight-alpha RGBA and poses ``(N, 4, 4)`` on the GPU.
        n_rays: rays of the first step; spr: the running samples-per-ray estimate (NaN before the first step).
        step: the index of the next step (for the error message of a non-finite loss).
    """

    def __init__(
        self,
        model: InstantNerf,
        opt: torch.optim.Adam,
        cfg: NerfConfig,
        norm: SceneNormalization,
        intr: Intrinsics,
        images: torch.Tensor,
        poses: torch.Tensor,
        *,
        n_rays: int,
        spr: float,
        step: int,
    ) -> None:
        self.model, self.opt, self.cfg, self.intr = model, opt, cfg, intr
        self.images, self.poses = images, poses
        dev = images.device
        self.device = dev
        self.kernels = kernels_for(images)
        self.lr = opt.param_groups[0]["lr"]
        if not isinstance(self.lr, torch.Tensor) or not all(g["lr"] is self.lr and g["capturable"] for g in opt.param_groups):
            raise ValueError("CudaTrainStep needs a capturable Adam whose groups share one CUDA lr tensor")
        self.slots = int(cfg.batch_rays)
        self.centre = torch.tensor(norm.centre, dtype=torch.float32, device=dev)  # made once: no copy in the graph
        self.scale = float(norm.scale)
        grid = model.occupancy
        # views of the grid's own storage: its updates are in place, so the captured graph sees them
        self.occ = grid.occupied.view(torch.uint8)
        self.bbox = grid.bbox
        self.rand = torch.rand(self.slots, _RAND_PER_RAY, device=dev)
        self.rand_gen = torch.Generator(device=dev)
        self.slot_index = torch.arange(self.slots, device=dev, dtype=torch.int32)
        self.n_active = torch.full((1,), int(n_rays), dtype=torch.int32, device=dev)
        self.spr = torch.full((1,), float(spr), dtype=torch.float64, device=dev)
        self.step_dev = torch.full((1,), int(step), dtype=torch.int64, device=dev)
        self.bad_step = torch.full((1,), -1, dtype=torch.int64, device=dev)
        self.bad_loss = torch.zeros(1, dtype=torch.float32, device=dev)
        self.loss = torch.zeros((), dtype=torch.float32, device=dev)
        self.mse = torch.zeros((), dtype=torch.float32, device=dev)
        self.rays_sum = torch.zeros(1, dtype=torch.int64, device=dev)
        self.need1 = torch.zeros(1, dtype=torch.int32, device=dev)
        self.need2 = torch.zeros(1, dtype=torch.int32, device=dev)
        self.dropped_sum = torch.zeros(1, dtype=torch.int64, device=dev)
        # the first step cannot overflow: every active ray's whole lattice fits
        per_ray = min(int(cfg.max_samples), int(cfg.march_steps) + 1)
        m1 = max(BUFFER_QUANTUM, int(n_rays) * per_ray)
        m2 = int(cfg.batch_samples) if cfg.batch_samples else m1
        self.buf = _Buffers.make(m1, m2, self.slots, dev)
        # the forward passes gather from a half-precision copy of the table, refreshed at the start of each step
        self.table_h2 = half_table(model.encoding)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.use_graph = graphs_enabled()
        self.captures = 0
        self.side = torch.cuda.Stream(device=dev)

    # ------------------------------------------------------------------ the step
    def _body(self) -> None:
        """Everything a step does on the device; no host sync, static shapes (captured as the graph)."""
        enc = self.model.encoding
        if self.table_h2 is not None:
            half_table(enc, out=self.table_h2)  # the table as the last step's Adam left it
            enc.half_table = self.table_h2
        try:
            self._body_passes()
        finally:
            enc.half_table = None

    def _body_passes(self) -> None:
        cfg, model, b, k = self.cfg, self.model, self.buf, self.kernels
        dt, min_t = cfg.march_dt, float(cfg.min_transmittance)
        n_img, h, w = self.images.shape[:3]
        u = self.rand
        img = (u[:, 0] * n_img).long().clamp_(max=n_img - 1)
        px = (u[:, 1] * w).long().clamp_(max=w - 1)
        py = (u[:, 2] * h).long().clamp_(max=h - 1)
        jitter = u[:, 3].contiguous()
        bg = u[:, 4:7]
        uv = torch.stack([px, py], dim=-1).float()[:, None, :] + 0.5
        rays_o, rays_d = get_rays(self.poses[img], self.intr, uv)
        o = ((rays_o[:, 0] - self.centre) * self.scale).contiguous()
        d = rays_d[:, 0].contiguous()
        rgba = self.images[img, py, px]
        target = rgba[:, :3] * rgba[:, 3:] + bg * (1.0 - rgba[:, 3:])
        b.total1.zero_()
        b.total2.zero_()
        k.march_fixed(o, d, jitter, self.bbox, self.occ, model.occupancy.res, dt, int(cfg.max_samples), self.n_active,
                      b.total1, b.starts1, b.counts1, b.dropped, b.ray1, b.t1)
        with torch.no_grad():
            sigma0 = model.density(o.index_select(0, b.ray1) + b.t1[:, None] * d.index_select(0, b.ray1))[0]
        k.compact_samples(sigma0.float().contiguous(), b.t1, b.starts1, b.counts1, dt, min_t, b.total2, b.starts2,
                          b.counts2, b.dropped, b.ray2, b.t2)
        dirs = d.index_select(0, b.ray2)
        sigma, geo = model.density(o.index_select(0, b.ray2) + b.t2[:, None] * dirs)
        rgb = model.color(dirs, geo)
        out = composite(sigma.float(), rgb.float(), b.t2, b.starts2, b.counts2, dt, min_t)
        pred = out["rgb"] + (1.0 - out["opacity"])[:, None] * bg
        weight = ((self.slot_index < self.n_active) & (b.dropped == 0)).float()  # (R,) rays in this step's loss
        n_valid = weight.sum().clamp(min=1.0)
        sq = ((pred - target) ** 2).sum(-1)
        if cfg.loss == "l2":
            per_ray = sq
        else:
            per_ray = torch.nn.functional.smooth_l1_loss(pred, target, beta=0.1, reduction="none").sum(-1)
        loss = (per_ray * weight).sum() / (3.0 * n_valid)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._bookkeeping(loss.detach(), (sq.detach() * weight).sum() / (3.0 * n_valid), weight)

    def _bookkeeping(self, loss: torch.Tensor, mse: torch.Tensor, weight: torch.Tensor) -> None:
        """Device-side counters and the batch-size rule of the eager step (EMA of samples per ray)."""
        cfg, b = self.cfg, self.buf
        self.loss.copy_(loss)
        self.mse.copy_(mse)
        first_bad = (~torch.isfinite(loss)) & (self.bad_step < 0)
        self.bad_loss.copy_(torch.where(first_bad, loss, self.bad_loss))
        self.bad_step.copy_(torch.where(first_bad, self.step_dev, self.bad_step))
        n_rays = self.n_active.double()
        spr_now = b.total2.double() / n_rays  # the samples asked for, so a drop does not bias the estimate
        self.spr.copy_(torch.where(torch.isnan(self.spr), spr_now, 0.7 * self.spr + 0.3 * spr_now))
        self.rays_sum += self.n_active
        self.dropped_sum += (self.slot_index < self.n_active).sum() - weight.sum().long()
        torch.maximum(self.need1, b.total1, out=self.need1)
        torch.maximum(self.need2, b.total2, out=self.need2)
        if cfg.batch_samples:
            want = cfg.batch_samples / self.spr.clamp(min=1e-3)
            n_next = (torch.round(want / MIN_RAYS) * MIN_RAYS).clamp(MIN_RAYS, cfg.batch_rays)
            self.n_active.copy_(n_next.to(torch.int32))
        self.step_dev += 1

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        self.graph = graph
        self.captures += 1

    def __call__(self, lr: float, seed: int) -> None:
        """Run one step with learning rate ``lr``, its random numbers drawn from a generator seeded ``seed``."""
        self.lr.fill_(lr)
        self.rand_gen.manual_seed(seed)
        torch.rand(self.rand.shape, generator=self.rand_gen, device=self.device, out=self.rand)
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.use_graph:
            self._body()
            return
        # an eager step on a side stream is also the warm-up that capture needs (lazy initialisation, cuBLAS
        # workspaces); then this body is captured and every later step replays it
        cur = torch.cuda.current_stream(self.device)
        self.side.wait_stream(cur)
        with torch.cuda.stream(self.side):
            self._body()
        cur.wait_stream(self.side)
        self._capture()

    # ------------------------------------------------------------------ host side, every few steps
    def readback(self) -> dict[str, Any]:
        """Read the counters (one sync), resize the buffers if the last steps needed it, and raise
        :class:`InstsimError` on a non-finite loss. Returns ``spr``, ``n_rays`` (of the next step), ``loss``,
        ``mse``, ``rays`` (summed since the last call), ``dropped`` (rays left out, summed likewise)."""
        vals = torch.cat([
            self.need1.double(), self.need2.double(), self.bad_step.double(), self.bad_loss.double(), self.spr,
            self.n_active.double(), self.loss.double()[None], self.mse.double()[None], self.rays_sum.double(),
            self.dropped_sum.double(),
        ]).tolist()
        need1, need2, bad_step, bad_loss, spr, n_rays, loss, mse, rays, dropped = vals
        if bad_step >= 0:
            raise NonFiniteLoss(bad_loss, int(bad_step))
        self.need1.zero_()
        self.need2.zero_()
        self.rays_sum.zero_()
        self.dropped_sum.zero_()
        m1 = buffer_capacity(int(need1), self.buf.m1)
        m2 = self.buf.m2 if self.cfg.batch_samples else buffer_capacity(int(need2), self.buf.m2)
        if (m1, m2) != (self.buf.m1, self.buf.m2):
            self.graph = None  # the next step recaptures with the new buffers
            self.model.zero_grad(set_to_none=True)
            self.buf = _Buffers.make(m1, m2, self.slots, self.device)
        return {"spr": spr, "n_rays": int(n_rays), "loss": loss, "mse": mse, "rays": int(rays), "dropped": int(dropped)}


class NonFiniteLoss(InstsimError):
    """A step's loss was NaN or infinite (``value``, ``step``); :func:`~instsim.nerf.train.train_nerf` words
    the message as for the eager path."""

    def __init__(self, value: float, step: int) -> None:
        super().__init__(f"loss is {value} at step {step}")
        self.value, self.step = value, step
