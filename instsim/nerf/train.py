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
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..cameras import Intrinsics, get_rays
from ..errors import InputError, InstsimError
from ..io import atomic_path
from ..transforms import Views
from .checkpoint import compare_fields, read_checkpoint, save_checkpoint
from .config import CONSTRUCTION_KEYS, NerfConfig, resolve_max_res
from .network import InstantNerf
from .normalization import SceneNormalization
from .occupancy import device_rand
from .rendering import render_rays

__all__ = ["train_nerf", "resolve_device", "lr_at", "non_finite_parameters", "LOG_COLUMNS"]

LOG_COLUMNS = ("step", "loss", "psnr", "rays_per_s", "occupied_fraction", "samples_per_ray", "rays", "lr", "elapsed_s")
_MIN_RAYS = 64


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU raises :class:`InstsimError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InstsimError(f"NeRF config asks for device {name!r} but no CUDA GPU is available")
    return dev


def lr_at(cfg: NerfConfig, step: int) -> float:
    """Learning rate at ``step``: linear warm-up over ``lr_warmup`` steps, then exponential decay from ``lr``
    to ``lr * lr_final_ratio`` at ``cfg.steps``."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup > 0 else 1.0
    frac = min(1.0, step / max(1, cfg.steps))
    return cfg.lr * warm * cfg.lr_final_ratio**frac


def _check_camera(views: Views, info: Mapping[str, Any]) -> None:
    """The views and the intrinsics dict must describe the same camera (else the scene bound is wrong)."""
    intr = views.intrinsics
    for key in ("w", "h", "fl_x", "fl_y", "cx", "cy"):
        if key in info and not math.isclose(float(info[key]), float(getattr(intr, key)), rel_tol=1e-4, abs_tol=1e-4):
            raise InputError(
                info.get("source"), key, f"intrinsics give {info[key]} but the training views have {getattr(intr, key)}"
            )


def _make_optimizer(model: InstantNerf, cfg: NerfConfig, device: torch.device) -> torch.optim.Adam:
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
    return torch.optim.Adam(groups, **kwargs)


class _TsvLog:
    """Append-only training log; on resume, rows after the resumed step (from the killed run) are dropped."""

    def __init__(self, path: str | Path, resume_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[list[str]] = []
        if resume_step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.reader(f, delimiter="\t")
                header = next(reader, None)
                if header == list(LOG_COLUMNS):
                    rows = [r for r in reader if r and r[0].isdigit() and int(r[0]) <= resume_step]
        # rewritten atomically: a kill during the rewrite must not lose the rows before the resumed step
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(LOG_COLUMNS)
            w.writerows(rows)

    def write(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow([_fmt(row[c]) for c in LOG_COLUMNS])


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` that hold a NaN or infinite value (empty if none)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _check_finite_weights(model: InstantNerf, step: int, kept: Path) -> None:
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
        the ``torch`` path), ``checkpoint``, ``finished``.

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
    device = resolve_device(cfg.device)
    _check_camera(train_views, intrinsics_info)
    norm = SceneNormalization.from_intrinsics(intrinsics_info)
    cfg = cfg.replace(max_res=resolve_max_res(cfg, intrinsics_info))
    intr: Intrinsics = train_views.intrinsics
    checkpoint_path = Path(checkpoint_path)
    state_path = Path(resume_path) if resume_path is not None else checkpoint_path
    stop = cfg.steps if max_steps is None else min(cfg.steps, int(max_steps))

    torch.manual_seed(cfg.seed)
    model = InstantNerf(cfg, norm).to(device)
    # pick the backend (and build or load the kernels) before the clock starts
    backend_used = "cuda" if model.uses_cuda_kernels else "torch"
    opt = _make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start, prior_time = 0, 0.0
    spr = float("nan")  # EMA of network samples per ray (NaN until the first step)
    n_rays = cfg.batch_rays
    if cfg.batch_samples:
        # before the first grid update every ray marches the whole cube: ~march_steps / 2 samples
        n_rays = max(_MIN_RAYS, min(cfg.batch_rays, cfg.batch_samples // max(1, cfg.march_steps // 2)))

    resume_from = next((p for p in (state_path, checkpoint_path) if p.is_file()), None)
    if resume_from is not None:
        state = read_checkpoint(resume_from)
        expect = {
            "config": {k: cfg.to_dict()[k] for k in CONSTRUCTION_KEYS},
            "normalization": norm.to_dict(),
            "intrinsics": intr.to_dict(),
        }
        diffs = compare_fields({k: state[k] for k in ("config", "normalization", "intrinsics")}, expect)
        if diffs:
            raise InstsimError(
                f"{resume_from}: cannot resume training, the checkpoint was made with other settings "
                "(delete it to start over):\n  " + "\n  ".join(diffs)
            )
        model.load_state_dict(state["model"])
        model.occupancy.refresh()
        if state.get("optimizer"):
            opt.load_state_dict(state["optimizer"])
        if state.get("rng"):
            gen.set_state(state["rng"]["generator"])
            torch.set_rng_state(state["rng"]["torch"])
        start = int(state["step"])
        prior_time = float(state.get("train", {}).get("elapsed_s", 0.0))
        n_rays = int(state.get("train", {}).get("rays_per_batch", n_rays))
        # the EMA of samples per ray steers the batch size; without it a resumed run takes other batches
        spr = float(state.get("train", {}).get("samples_per_ray_ema", spr))

    log = _TsvLog(log_tsv_path, start)
    images = train_views.images.to(device)  # (N, H, W, 4)
    poses = train_views.poses.to(device=device, dtype=torch.float32)
    n_img, h, w = images.shape[:3]
    dt = cfg.march_dt
    sigma_thr = -math.log(1.0 - cfg.grid_threshold) / dt
    model.train()

    def density_fn(p: torch.Tensor) -> torch.Tensor:
        return model.density(p)[0]

    def checkpoint(step: int, elapsed: float, path: Path) -> None:
        _check_finite_weights(model, step, state_path)
        save_checkpoint(
            path,
            model,
            step=step,
            intrinsics=intr,
            optimizer=opt,
            rng=_rng_state(gen),
            train={"elapsed_s": elapsed, "rays_per_batch": n_rays, "samples_per_ray_ema": spr},
        )

    bar = None
    if progress and stop > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=start, desc="nerf", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_log, rays_since_log = t_start, 0
    last: dict[str, Any] = {}
    step = start
    for step in range(start, stop):
        if step >= cfg.grid_warmup and (step - cfg.grid_warmup) % cfg.grid_update_every == 0:
            model.occupancy.update(
                density_fn,
                decay=cfg.grid_decay,
                sigma_threshold=sigma_thr,
                sample_fraction=cfg.grid_sample_fraction,
                generator=gen,
                full=int(model.occupancy.n_updates) == 0,
            )
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        # a batch of random pixels of random views
        rand = device_rand(gen, device)
        img = (rand(n_rays) * n_img).long().clamp_(max=n_img - 1)
        px = (rand(n_rays) * w).long().clamp_(max=w - 1)
        py = (rand(n_rays) * h).long().clamp_(max=h - 1)
        jitter = rand(n_rays)
        bg = rand(n_rays, 3)
        uv = torch.stack([px, py], dim=-1).float()[:, None, :] + 0.5  # pixel centres, (n, 1, 2)
        rays_o, rays_d = get_rays(poses[img], intr, uv)
        o = norm.to_nerf(rays_o[:, 0])
        d = rays_d[:, 0]
        rgba = images[img, py, px]
        target = rgba[:, :3] * rgba[:, 3:] + bg * (1.0 - rgba[:, 3:])
        out = render_rays(model, o, d, jitter=jitter)
        pred = out["rgb"] + (1.0 - out["opacity"])[:, None] * bg
        mse = torch.mean((pred - target) ** 2)
        loss = mse if cfg.loss == "l2" else torch.nn.functional.smooth_l1_loss(pred, target, beta=0.1)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            if bar is not None:
                bar.close()
            raise InstsimError(
                f"NeRF training diverged: loss is {loss_value} at step {step}. The last good checkpoint "
                f"({state_path if state_path.is_file() else 'none written yet'}) is kept; lower nerf.lr or check the data"
            )
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:  # no sample on any ray (an empty grid) leaves nothing to learn this step
            loss.backward()
            opt.step()

        # adapt the rays per step to the sample budget (EMA of samples per ray)
        n_eval = int(out["n_evals"])
        spr_now = n_eval / n_rays
        spr = spr_now if math.isnan(spr) else 0.7 * spr + 0.3 * spr_now
        rays_since_log += n_rays
        if cfg.batch_samples:
            want = cfg.batch_samples / max(spr, 1e-3)
            n_rays = int(max(_MIN_RAYS, min(cfg.batch_rays, round(want / _MIN_RAYS) * _MIN_RAYS)))

        done = step + 1
        if done % cfg.log_every == 0 or done == stop:
            now = time.perf_counter()
            psnr = -10.0 * math.log10(max(float(mse.detach()), 1e-10))
            last = {
                "step": done,
                "loss": loss_value,
                "psnr": psnr,
                "rays_per_s": rays_since_log / max(now - t_log, 1e-9),
                "occupied_fraction": model.occupancy.occupied_fraction(),
                "samples_per_ray": spr,
                "rays": n_rays,
                "lr": lr_at(cfg, step),
                "elapsed_s": prior_time + now - t_start,
            }
            log.write(last)
            t_log, rays_since_log = now, 0
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4g}", psnr=f"{psnr:.2f}", occ=f"{last['occupied_fraction']:.3f}")
            if on_log is not None:
                t_hook = time.perf_counter()
                on_log(done, model)
                model.train()
                paused = time.perf_counter() - t_hook
                t_start += paused  # the hook's time is not training time
                t_log += paused
        if bar is not None:
            bar.update(1)
        if done % cfg.checkpoint_every == 0 and done < stop:
            checkpoint(done, prior_time + time.perf_counter() - t_start, state_path)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    final_step = max(start, stop)
    finished = final_step >= cfg.steps
    if stop > start or not checkpoint_path.is_file():
        checkpoint(final_step, prior_time + elapsed, checkpoint_path if finished else state_path)
        if finished and state_path != checkpoint_path:
            state_path.unlink(missing_ok=True)
    return {
        "step": final_step,
        "start_step": start,
        "steps_run": final_step - start,
        "finished": finished,
        "train_time_s": elapsed,
        "total_time_s": prior_time + elapsed,
        "loss": last.get("loss"),
        "psnr": last.get("psnr"),
        "rays_per_s": last.get("rays_per_s"),
        "occupied_fraction": model.occupancy.occupied_fraction(),
        "samples_per_ray": None if math.isnan(spr) else spr,
        "device": str(device),
        "backend": backend_used,
        "checkpoint": str(checkpoint_path if finished else state_path),
        "config": cfg.to_dict(),
    }
