"""Train one Instant-NeRF on the RGBA views of one class: :func:`train_nerf`.

Each step draws random pixels from all training views, gives every ray a random background colour and
composites the straight-alpha target over it, so the model cannot explain a background pixel with coloured
fog and must learn alpha (Instant-NGP's trick for transparent-background data). The number of rays per
step adapts so a step evaluates about ``batch_samples`` network samples (Instant-NGP's fixed sample budget):
early steps march through fog and are expensive per ray, later ones are cheap.

Training resumes from its checkpoint: if the checkpoint (or ``resume_path``) exists, the model, optimizer,
occupancy grid, step, random state and the running samples-per-ray estimate (which sets the batch size) are
restored and training continues to ``cfg.steps``, ending with the same weights, bit for bit on the same CPU
and thread count, as an uninterrupted run. A non-finite loss stops training, and a checkpoint is never
written from non-finite weights, so the last checkpoint on disk is always a good one.

With the CUDA kernels a step is :class:`~instsim.nerf.cuda_train.CudaTrainStep` (fixed-size sample buffers,
replayed as a CUDA graph; its loss and batch-size state are read back every few steps, so a non-finite loss is
caught within :data:`~instsim.nerf.cuda_train.READBACK_EVERY` steps and always before a checkpoint is
written); the PyTorch path (any device) is the reference and reads the loss every step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..cameras import get_rays
from ..errors import InstsimError
from ..transforms import Views
from .config import NerfConfig
from .network import InstantNerf
from .train_log import LOG_COLUMNS, TrainClock, TrainLog
from .train_state import TrainRun, make_optimizer, non_finite_parameters, resume_run, save_state, setup_run
from .occupancy import device_rand
from .rendering import render_rays
from .cuda_train import MIN_RAYS, READBACK_EVERY, CudaTrainStep, NonFiniteLoss

__all__ = ["train_nerf", "lr_at", "make_optimizer", "non_finite_parameters", "LOG_COLUMNS"]



def lr_at(cfg: NerfConfig, step: int) -> float:
    """Learning rate at ``step``: linear warm-up over ``lr_warmup`` steps, then exponential decay from ``lr``
    to ``lr * lr_final_ratio`` at ``cfg.steps``."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup > 0 else 1.0
    frac = min(1.0, step / max(1, cfg.steps))
    return cfg.lr * warm * cfg.lr_final_ratio**frac


def train_nerf(
    train_views: Views,
    intrinsics_info: Mapping[str, Any],
    cfg: NerfConfig,
    checkpoint_path: str | Path,
    log_tsv_path: str | Path,
    progress: bool = True,
    max_steps: int | None = None,
    resume_path: str | Path | None = None,
    on_log: Callable[[int, InstantNerf], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) a NeRF and write its checkpoint.

    Args:
        train_views: training images ``(N, H, W, 4)`` straight-alpha RGBA with poses (world units).
        intrinsics_info: the ``extract_intrinsics`` dict of the same transforms file (scene centre, bound,
            camera distance: the normalization and ``max_res="auto"`` come from it).
        cfg: settings; ``cfg.steps`` is the total number of steps (the schedule spans it).
        checkpoint_path: the final checkpoint; also the periodic one unless ``resume_path`` is given.
        log_tsv_path: ``train_log.tsv`` (columns :data:`LOG_COLUMNS`).
        progress: show a tqdm bar.
        max_steps: stop once this many steps are done in total (for tests and time-boxed runs); the
            checkpoint then holds the partial model and a later call resumes it.
        resume_path: where periodic checkpoints go and training resumes from (so a workflow can keep the
            final ``checkpoint_path`` absent until training finishes). Default: ``checkpoint_path``.
        on_log: called as ``on_log(step, model)`` after each logged step (e.g. a benchmark's test-view
            evaluation); its time is excluded from every reported time and rate. It must leave the model
            as it found it (it is called in train mode; use ``torch.no_grad``).

    Returns:
        summary dict: ``step``, ``start_step``, ``steps_run``, ``train_time_s`` (this call),
        ``total_time_s`` (all calls), ``loss``, ``psnr`` (last logged, on random backgrounds),
        ``rays_per_s``, ``occupied_fraction``, ``samples_per_ray``, ``device``, ``backend`` (``cuda`` kernels or
        the ``torch`` path), ``checkpoint``, ``finished``, ``config``, ``cuda_graph_captures`` (0 on the PyTorch
        path).

    Raises:
        InstsimError: non-finite loss (naming the step; the last good checkpoint is kept), a checkpoint
            that does not match this run's config/normalization/camera.
    """
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(train_views, intrinsics_info, cfg, checkpoint_path, log_tsv_path, progress, max_steps, resume_path, on_log)
    finally:
        torch.set_num_threads(threads)  # cfg.threads applies to this call only


def _update_grid(run: TrainRun, step: int) -> None:
    """The occupancy-grid update due before ``step`` (every ``grid_update_every`` steps after the warm-up)."""
    cfg, model = run.cfg, run.model
    if step < cfg.grid_warmup or (step - cfg.grid_warmup) % cfg.grid_update_every:
        return
    model.occupancy.update(
        lambda p: model.density(p)[0],
        decay=cfg.grid_decay,
        sigma_threshold=-math.log(1.0 - cfg.grid_threshold) / cfg.march_dt,
        sample_fraction=cfg.grid_sample_fraction,
        generator=run.gen,
        full=int(model.occupancy.n_updates) == 0,
    )


def _torch_step(run: TrainRun, step: int) -> tuple[float, torch.Tensor]:
    """One step on the reference path (PyTorch, CPU or GPU): random pixels of random views, a render, the
    loss, Adam, and the batch size of the next step. Returns the loss (read now, so a non-finite one stops
    training before it reaches the weights) and the MSE (a device tensor). A non-finite loss raises."""
    cfg, model, opt = run.cfg, run.model, run.opt
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    n_rays, images, poses = run.n_rays, run.images, run.poses
    n_img, h, w = images.shape[:3]
    rand = device_rand(run.gen, run.device)
    img = (rand(n_rays) * n_img).long().clamp_(max=n_img - 1)
    px = (rand(n_rays) * w).long().clamp_(max=w - 1)
    py = (rand(n_rays) * h).long().clamp_(max=h - 1)
    jitter = rand(n_rays)
    bg = rand(n_rays, 3)
    uv = torch.stack([px, py], dim=-1).float()[:, None, :] + 0.5  # pixel centres, (n, 1, 2)
    rays_o, rays_d = get_rays(poses[img], run.intr, uv)
    o = run.norm.to_nerf(rays_o[:, 0])
    d = rays_d[:, 0]
    rgba = images[img, py, px]
    target = rgba[:, :3] * rgba[:, 3:] + bg * (1.0 - rgba[:, 3:])
    out = render_rays(model, o, d, jitter=jitter)
    pred = out["rgb"] + (1.0 - out["opacity"])[:, None] * bg
    mse = torch.mean((pred - target) ** 2)
    loss = mse if cfg.loss == "l2" else torch.nn.functional.smooth_l1_loss(pred, target, beta=0.1)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise _diverged(run, loss_value, step)
    opt.zero_grad(set_to_none=True)
    if loss.requires_grad:  # no sample on any ray (an empty grid) leaves nothing to learn this step
        loss.backward()
        opt.step()
    # adapt the rays per step to the sample budget (EMA of samples per ray)
    spr_now = int(out["n_evals"]) / n_rays
    run.spr = spr_now if math.isnan(run.spr) else 0.7 * run.spr + 0.3 * spr_now
    if cfg.batch_samples:
        want = cfg.batch_samples / max(run.spr, 1e-3)
        run.n_rays = int(max(MIN_RAYS, min(cfg.batch_rays, round(want / MIN_RAYS) * MIN_RAYS)))
    return loss_value, mse


def _diverged(run: TrainRun, loss_value: float, step: int) -> InstsimError:
    kept = run.state_path if run.state_path.is_file() else "none written yet"
    return InstsimError(
        f"NeRF training diverged: loss is {loss_value} at step {step}. The last good checkpoint "
        f"({kept}) is kept; lower nerf.lr or check the data"
    )


def _readback_due(run: TrainRun, done: int) -> bool:
    """When the CUDA-graph step's counters are read: every few steps, at the first steps (so the buffers find
    their size early), and whenever training logs, checkpoints or stops."""
    cfg = run.cfg
    early = done < READBACK_EVERY and done & (done - 1) == 0
    return (
        early
        or done % READBACK_EVERY == 0
        or done % cfg.log_every == 0
        or done % cfg.checkpoint_every == 0
        or done == run.stop
    )


def _log_step(run: TrainRun, log: TrainLog, clock: TrainClock, done: int, step: int, loss_value: float, mse: float) -> dict[str, Any]:
    """Write one log row (:data:`LOG_COLUMNS`) and restart the rays-per-second window."""
    now = time.perf_counter()
    row = {
        "step": done,
        "loss": loss_value,
        "psnr": -10.0 * math.log10(max(mse, 1e-10)),
        "rays_per_s": clock.rays / max(now - clock.last_log, 1e-9),
        "occupied_fraction": run.model.occupancy.occupied_fraction(),
        "samples_per_ray": run.spr,
        "rays": run.n_rays,
        "lr": lr_at(run.cfg, step),
        "elapsed_s": run.prior_time + now - clock.start,
    }
    log.write(row)
    clock.last_log, clock.rays = now, 0
    return row


def _train(
    train_views: Views,
    intrinsics_info: Mapping[str, Any],
    cfg: NerfConfig,
    checkpoint_path: str | Path,
    log_tsv_path: str | Path,
    progress: bool,
    max_steps: int | None,
    resume_path: str | Path | None,
    on_log: Callable[[int, InstantNerf], None] | None,
) -> dict[str, Any]:
    run = setup_run(train_views, intrinsics_info, cfg, checkpoint_path, resume_path, max_steps)
    resume_run(run)
    cfg, model = run.cfg, run.model
    log = TrainLog(log_tsv_path, run.start)
    run.images = train_views.images.to(run.device)  # (N, H, W, 4)
    run.poses = train_views.poses.to(device=run.device, dtype=torch.float32)
    model.train()
    if run.backend == "cuda":
        run.fast = CudaTrainStep(
            model, run.opt, cfg, run.norm, run.intr, run.images, run.poses, n_rays=run.n_rays, spr=run.spr, step=run.start
        )
    bar = None
    if progress and run.stop > run.start:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.stop, initial=run.start, desc="nerf", unit="step", dynamic_ncols=True)
    clock = TrainClock()
    last: dict[str, Any] = {}
    try:
        for step in range(run.start, run.stop):
            _update_grid(run, step)
            row = _one_step(run, log, clock, step, on_log)
            last = row or last
            if bar is not None:
                if row:
                    bar.set_postfix(loss=f"{row['loss']:.4g}", psnr=f"{row['psnr']:.2f}", occ=f"{row['occupied_fraction']:.3f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return _finish(run, clock, last)


def _one_step(
    run: TrainRun, log: TrainLog, clock: TrainClock, step: int, on_log: Callable[[int, InstantNerf], None] | None
) -> dict[str, Any] | None:
    """Train step ``step``, then log and checkpoint when due. Returns the log row, if one was written."""
    cfg, done = run.cfg, step + 1
    loss_value = mse = float("nan")
    if run.fast is None:
        n_rays = run.n_rays
        loss_value, mse_t = _torch_step(run, step)
        clock.rays += n_rays
        if done % cfg.log_every == 0 or done == run.stop:
            mse = float(mse_t.detach())
    else:
        run.fast(lr_at(cfg, step), int(torch.randint(0, 2**62, (1,), generator=run.gen)))
        if _readback_due(run, done):
            try:
                r = run.fast.readback()
            except NonFiniteLoss as e:
                raise _diverged(run, e.value, e.step) from None
            run.spr, run.n_rays = r["spr"], r["n_rays"]
            clock.rays += r["rays"]
            loss_value, mse = r["loss"], r["mse"]
    row = None
    if done % cfg.log_every == 0 or done == run.stop:
        row = _log_step(run, log, clock, done, step, loss_value, mse)
        if on_log is not None:
            t_hook = time.perf_counter()
            on_log(done, run.model)
            run.model.train()
            clock.pause_since(t_hook)  # the hook's time is not training time
    if done % cfg.checkpoint_every == 0 and done < run.stop:
        save_state(run, done, run.prior_time + clock.elapsed(), run.state_path)
    return row


def _finish(run: TrainRun, clock: TrainClock, last: Mapping[str, Any]) -> dict[str, Any]:
    """Write the final (or, when stopped early, the periodic) checkpoint and return the summary."""
    elapsed = clock.elapsed()
    final_step = max(run.start, run.stop)
    finished = final_step >= run.cfg.steps
    if run.stop > run.start or not run.checkpoint_path.is_file():
        save_state(run, final_step, run.prior_time + elapsed, run.checkpoint_path if finished else run.state_path)
        if finished and run.state_path != run.checkpoint_path:
            run.state_path.unlink(missing_ok=True)
    return {
        "step": final_step,
        "start_step": run.start,
        "steps_run": final_step - run.start,
        "finished": finished,
        "train_time_s": elapsed,
        "total_time_s": run.prior_time + elapsed,
        "loss": last.get("loss"),
        "psnr": last.get("psnr"),
        "rays_per_s": last.get("rays_per_s"),
        "occupied_fraction": run.model.occupancy.occupied_fraction(),
        "samples_per_ray": None if math.isnan(run.spr) else run.spr,
        "device": str(run.device),
        "backend": run.backend,
        "checkpoint": str(run.checkpoint_path if finished else run.state_path),
        "config": run.cfg.to_dict(),
        "cuda_graph_captures": run.fast.captures if run.fast is not None else 0,
    }
