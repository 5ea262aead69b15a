"""The state of one NeRF training run (:class:`TrainRun`): its set-up (camera check, model, optimizer,
generators), resume from a checkpoint, and checkpoint writes that refuse non-finite weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..backend import resolve_device
from ..cameras import Intrinsics
from ..errors import InputError, InstsimError
from ..transforms import Views
from .checkpoint import compare_fields, read_checkpoint, save_checkpoint
from .config import CONSTRUCTION_KEYS, NerfConfig, resolve_max_res
from .cuda_train import MIN_RAYS, CudaTrainStep
from .network import InstantNerf
from .normalization import SceneNormalization

__all__ = ["TrainRun", "check_camera", "check_finite_weights", "make_optimizer", "non_finite_parameters", "resume_run",
           "save_state", "setup_run"]


def check_camera(views: Views, info: Mapping[str, Any]) -> None:
    """The views and the intrinsics dict must describe the same camera (else the scene bound is wrong)."""
    intr = views.intrinsics
    for key in ("w", "h", "fl_x", "fl_y", "cx", "cy"):
        if key in info and not math.isclose(float(info[key]), float(getattr(intr, key)), rel_tol=1e-4, abs_tol=1e-4):
            raise InputError(
                info.get("source"), key, f"intrinsics give {info[key]} but the training views have {getattr(intr, key)}"
            )


def make_optimizer(model: InstantNerf, cfg: NerfConfig, device: torch.device, capturable: bool = False) -> torch.optim.Adam:
    """Adam over the model's parameters (weight decay on the MLPs only); fused on a GPU. ``capturable``: every
    group shares one CUDA tensor as its ``lr`` and the step can be captured in a CUDA graph
    (:mod:`~instsim.nerf.cuda_train`)."""
    # weight decay only on the MLPs: decaying the hash table would pull unvisited entries to 0 for nothing
    groups = [
        {"params": [model.encoding.table], "weight_decay": 0.0},
        {
            "params": list(model.density_net.parameters()) + list(model.color_net.parameters()),
            "weight_decay": cfg.weight_decay,
        },
    ]
    kwargs: dict[str, Any] = {"betas": (0.9, 0.99), "eps": 1e-15, "lr": cfg.lr}
    if device.type == "cuda":
        kwargs["fused"] = True
    if capturable:
        kwargs["capturable"] = True
        kwargs["lr"] = torch.tensor(float(cfg.lr), dtype=torch.float32, device=device)
    return torch.optim.Adam(groups, **kwargs)


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` that hold a NaN or infinite value (empty if none)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_weights(model: InstantNerf, step: int, kept: Path) -> None:
    """Refuse to write a checkpoint of a broken model.

    The loss guard catches a NaN forward pass, but a finite loss with a non-finite gradient (an overflow in
    the backward pass) poisons the weights through Adam one step before the loss shows it; written as a
    checkpoint, that would replace the last good one and a resume would start from garbage.
    """
    bad = non_finite_parameters(model)
    if bad:
        raise InstsimError(
            f"NeRF training diverged: non-finite values in {', '.join(bad[:5])} after step {step}. The last good "
            f"checkpoint ({kept if kept.is_file() else 'none written yet'}) is kept; lower nerf.lr or check the data"
        )


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"generator": gen.get_state(), "torch": torch.get_rng_state()}


@dataclass
class TrainRun:
    """The state of one :func:`train_nerf` call, shared by its set-up, resume, step and logging functions."""

    cfg: NerfConfig
    device: torch.device
    norm: SceneNormalization
    intr: Intrinsics
    model: InstantNerf
    opt: torch.optim.Adam
    gen: torch.Generator
    checkpoint_path: Path
    state_path: Path
    stop: int
    backend: str
    start: int = 0
    prior_time: float = 0.0
    spr: float = float("nan")  # EMA of network samples per ray (NaN until the first step)
    n_rays: int = 0
    images: torch.Tensor | None = None  # (N, H, W, 4) on the device
    poses: torch.Tensor | None = None  # (N, 4, 4) float32 on the device
    fast: CudaTrainStep | None = None  # the CUDA-graph step, when the model runs the CUDA kernels


def setup_run(
    train_views: Views,
    intrinsics_info: Mapping[str, Any],
    cfg: NerfConfig,
    checkpoint_path: str | Path,
    resume_path: str | Path | None,
    max_steps: int | None,
) -> TrainRun:
    """Check the camera, build the model (and so pick the backend) and the optimizer, seed the generators."""
    device = resolve_device(cfg.device, "NeRF config", "device")
    check_camera(train_views, intrinsics_info)
    norm = SceneNormalization.from_intrinsics(intrinsics_info)
    cfg = cfg.replace(max_res=resolve_max_res(cfg, intrinsics_info))
    checkpoint_path = Path(checkpoint_path)
    torch.manual_seed(cfg.seed)
    model = InstantNerf(cfg, norm).to(device)
    # pick the backend (and build or load the kernels) before the clock starts
    fast = model.uses_cuda_kernels
    run = TrainRun(
        cfg=cfg,
        device=device,
        norm=norm,
        intr=train_views.intrinsics,
        model=model,
        opt=make_optimizer(model, cfg, device, capturable=fast),
        gen=torch.Generator().manual_seed(cfg.seed + 1),
        checkpoint_path=checkpoint_path,
        state_path=Path(resume_path) if resume_path is not None else checkpoint_path,
        stop=cfg.steps if max_steps is None else min(cfg.steps, int(max_steps)),
        backend="cuda" if fast else "torch",
        n_rays=cfg.batch_rays,
    )
    if cfg.batch_samples:
        # before the first grid update every ray marches the whole cube: ~march_steps / 2 samples
        run.n_rays = max(MIN_RAYS, min(cfg.batch_rays, cfg.batch_samples // max(1, cfg.march_steps // 2)))
    return run


def resume_run(run: TrainRun) -> None:
    """Restore model, optimizer, grid, random state, step, time and batch-size state from the checkpoint, if
    one exists; a checkpoint made with other construction settings is an error naming each difference."""
    resume_from = next((p for p in (run.state_path, run.checkpoint_path) if p.is_file()), None)
    if resume_from is None:
        return
    state = read_checkpoint(resume_from)
    expect = {
        "config": {k: run.cfg.to_dict()[k] for k in CONSTRUCTION_KEYS},
        "normalization": run.norm.to_dict(),
        "intrinsics": run.intr.to_dict(),
    }
    diffs = compare_fields({k: state[k] for k in ("config", "normalization", "intrinsics")}, expect)
    if diffs:
        raise InstsimError(
            f"{resume_from}: cannot resume training, the checkpoint was made with other settings "
            "(delete it to start over):\n  " + "\n  ".join(diffs)
        )
    run.model.load_state_dict(state["model"])
    run.model.occupancy.refresh()
    if state.get("optimizer"):
        _load_optimizer(run.opt, state["optimizer"])
    if state.get("rng"):
        run.gen.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
    run.start = int(state["step"])
    train = state.get("train", {})
    run.prior_time = float(train.get("elapsed_s", 0.0))
    run.n_rays = int(train.get("rays_per_batch", run.n_rays))
    # the EMA of samples per ray steers the batch size; without it a resumed run takes other batches
    run.spr = float(train.get("samples_per_ray_ema", run.spr))


def _load_optimizer(opt: torch.optim.Adam, saved: Mapping[str, Any]) -> None:
    """Load Adam's moments and steps, keeping this optimizer's own ``lr`` object and fused/capturable flags (a
    checkpoint of the CUDA-graph step resumes on the PyTorch path and the other way round)."""
    own = [{k: g[k] for k in ("lr", "capturable", "fused") if k in g} for g in opt.param_groups]
    opt.load_state_dict(saved)
    for group, keep in zip(opt.param_groups, own):
        group.update(keep)
        if group.get("capturable") or group.get("fused"):
            for p in group["params"]:
                st = opt.state.get(p, {})
                if "step" in st:  # fused and capturable Adam keep the step count on the parameter's device
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def save_state(run: TrainRun, step: int, elapsed: float, path: Path) -> None:
    check_finite_weights(run.model, step, run.state_path)
    save_checkpoint(
        path,
        run.model,
        step=step,
        intrinsics=run.intr,
        optimizer=run.opt,
        rng=_rng_state(run.gen),
        train={"elapsed_s": elapsed, "rays_per_batch": run.n_rays, "samples_per_ray_ema": run.spr},
    )
