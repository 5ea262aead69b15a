"""Seeded, checkpointed, resumable detector training, and a short fine-tune for Neural-Sim's inner loop.

Determinism: the weights depend only on the data and the :class:`~.config.DetectorConfig`. The batches depend
only on ``(cfg.seed, step)`` (:mod:`.batches`) and the learning rate is a pure function of the step, so a run
resumed from a checkpoint (:mod:`.checkpoint`) ends with the same weights (bit for bit on the same CPU and
thread count) as an uninterrupted run. A non-finite loss or gradient stops training with
:class:`DetectorTrainingError`; the last checkpoint written (a good one) is kept.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import InstsimError
from ..io import save_torch
from .batches import BatchPrefetcher, augment_batch, batch_indices, make_batch
from .checkpoint import (
    CHECKPOINT_FORMAT,
    check_resume,
    data_fingerprint,
    load_detector,
    read_checkpoint,
    save_detector,
)
from .config import DetectorConfig, steps_per_epoch
from .loss import compute_loss
from .model import CenterNet, build_detector
from .targets import DetectionTargets

__all__ = [
    "DetectorTrainingError",
    "lr_at",
    "augment_batch",
    "param_groups",
    "train_detector",
    "finetune",
    "save_detector",
    "load_detector",
    "data_fingerprint",
]


class DetectorTrainingError(InstsimError):
    """Training diverged (non-finite loss or gradient)."""


def lr_at(step: int, total_steps: int, cfg: DetectorConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``cfg.warmup_steps``, then
    cosine from ``cfg.lr`` down to ``cfg.lr * cfg.min_lr_ratio`` at the last step."""
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    t = (step - warm) / max(total_steps - 1 - warm, 1)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * min(t, 1.0)))


def _check_data(images: torch.Tensor, boxes: Sequence, labels: Sequence, cfg: DetectorConfig) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if len(images) == 0:
        raise ValueError("no training images")
    if len(boxes) != len(images) or len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(boxes)} box lists and {len(labels)} label lists")
    H, W = images.shape[2:]
    if H % cfg.stride or W % cfg.stride:
        raise ValueError(f"image size {(H, W)} must be divisible by the stride {cfg.stride}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on weights, none on biases and GroupNorm affine parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)  # no decay on biases and GroupNorm affine params
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _train_step(model: CenterNet, opt: torch.optim.Optimizer, x: torch.Tensor, targets, lr: float,
                grad_clip: float) -> tuple[float, dict[str, float], float]:
    for g in opt.param_groups:
        g["lr"] = lr
    loss, parts = compute_loss(model(x), targets, model.cfg)
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return float(loss.detach()), parts, float("nan")
    loss.backward()
    if grad_clip > 0:
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    else:
        gnorm = float(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in model.parameters() if p.grad is not None)))
    if math.isfinite(gnorm):
        opt.step()
    return float(loss.detach()), parts, gnorm


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _resume(ckpt: Path, model: CenterNet, opt: torch.optim.Optimizer, cfg: DetectorConfig, fingerprint: str | None,
            total: int, say: Callable[[str], None]) -> int:
    """Load a training checkpoint into ``model``/``opt`` (and the global RNG); returns its step."""
    ck = read_checkpoint(ckpt)
    check_resume(ck, ckpt, cfg, fingerprint)
    model.load_state_dict(ck["model"])
    if "optimizer" in ck:
        opt.load_state_dict(ck["optimizer"])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"])
    start = int(ck.get("step", total))
    say(f"resumed detector training from {ckpt} at step {start}/{total}")
    return start


def _save(ckpt: Path | None, step: int, total: int, cfg: DetectorConfig, model: CenterNet, opt: torch.optim.Optimizer,
          fingerprint: str | None) -> None:
    if ckpt is None:
        return
    save_torch({"format": CHECKPOINT_FORMAT, "step": step, "total_steps": total, "complete": step >= total,
                "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), "data": fingerprint}, ckpt)


def _device_batches(images: torch.Tensor, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                    cfg: DetectorConfig, start: int, stop: int, device: torch.device, dtype: torch.dtype,
                    prefetch: bool) -> Iterator[tuple[torch.Tensor, DetectionTargets]]:
    """The augmented batches of steps ``start..stop-1`` on ``device``."""
    cache: dict = {}
    indices = lambda step: batch_indices(cfg.seed, step, len(images), cfg.batch_size, cache)  # noqa: E731
    make = lambda idx, step: make_batch(images, boxes, labels, idx, cfg, step, True, dtype)  # noqa: E731
    if not (prefetch and device.type == "cuda" and start < stop):
        # on a CPU, building batches in threads would only take cores from the training step itself
        for step in range(start, stop):
            x, t = make(indices(step), step)
            yield x.to(device), t.to(device)
        return
    ahead = BatchPrefetcher(make, indices, start, stop, workers=max(1, torch.get_num_threads()), pin=True)
    try:
        for _ in range(start, stop):
            x, t = ahead.get()
            yield x.to(device, non_blocking=True), t.to(device)
    finally:
        ahead.close()


def _diverged(step: int, loss: float, parts: dict, gnorm: float, cfg: DetectorConfig, ckpt: Path | None,
              last_saved: int | None) -> DetectorTrainingError:
    where = f"; last good checkpoint: {ckpt} (step {last_saved})" if last_saved is not None else ""
    return DetectorTrainingError(
        f"detector training diverged at step {step}: loss {loss} (heatmap {parts['heatmap']:.4g}, size "
        f"{parts['size']:.4g}, offset {parts['offset']:.4g}), gradient norm {gnorm}; try a lower lr (now {cfg.lr}){where}")


def _record_step(step: int, total: int, loss: float, parts: dict, lr: float, gnorm: float, history: list | None,
                 bar: tqdm, say: Callable[[str], None], log_every: int) -> None:
    if history is not None:
        history.append({"step": step, "loss": loss, **{k: parts[k] for k in ("heatmap", "size", "offset")},
                        "lr": lr, "grad_norm": gnorm})
    bar.update(1)
    if step % 10 == 0:
        bar.set_postfix(loss=f"{loss:.3f}")
    if log_every and (step + 1) % log_every == 0:
        say(f"step {step + 1}/{total} loss {loss:.4f} (heatmap {parts['heatmap']:.4f} size {parts['size']:.4f} "
            f"offset {parts['offset']:.4f}) lr {lr:.2e}")


def train_detector(
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    cfg: DetectorConfig | None = None,
    log: Callable[[str], None] | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = True,
    log_every: int = 50,
    history: list | None = None,
    num_threads: int | None = None,
    device: str | torch.device = "cpu",
    prefetch: bool = True,
) -> CenterNet:
    """Train a detector from scratch (or resume one) on ``images``.

    Args:
        images: ``(N, 3, H, W)`` float in ``[0, 1]`` or uint8.
        boxes: per image ``(n_i, 4)`` xywh pixel boxes.
        labels: per image ``(n_i,)`` 0-based class indices (< ``cfg.num_classes``).
        cfg: the configuration (default :class:`DetectorConfig()`).
        log: called with one-line progress messages (start, every ``log_every`` steps, end).
        checkpoint_path: where to write a checkpoint every ``cfg.checkpoint_every`` steps and at the end.
        resume: continue from ``checkpoint_path`` when it exists (a complete checkpoint just loads).
        max_steps: stop after this many steps in total (the schedule still spans the full run), e.g. to
            interrupt and resume; a checkpoint is written at the stop.
        progress: show a tqdm bar.
        history: if given, a dict per step is appended: ``step, loss, heatmap, size, offset, lr, grad_norm``.
        num_threads: torch intra-op threads while training (restored afterwards); ``None`` keeps the current
            setting. On a CPU shared with other jobs, 1 thread per job is much faster than oversubscribing
            (torch's OpenMP threads spin while waiting for descheduled siblings). Does not change the result
            beyond float rounding order.
        device: where the model and each batch live while training (batches are drawn, augmented and
            encoded on the CPU, as on a CPU run, so the data stream is the same on every device; results on a
            GPU differ from the CPU's by float rounding). The returned model is on the CPU.
        prefetch: on a GPU, build the batches ahead in ``torch.get_num_threads()`` threads while the GPU
            trains (the same batches, so the same result); False builds each in the loop (for comparison).

    Returns:
        the model (train mode off: ``eval()``).

    Raises:
        DetectorTrainingError: non-finite loss/gradient (the last checkpoint is kept).
        ConfigError / InputError: the checkpoint belongs to another config / other data, or is unreadable.
    """
    cfg = cfg or DetectorConfig()
    _check_data(images, boxes, labels, cfg)
    if num_threads is not None:
        with _torch_threads(int(num_threads)):
            return train_detector(images, boxes, labels, cfg, log, checkpoint_path, resume, max_steps, progress,
                                  log_every, history, None, device, prefetch)
    say = log or (lambda msg: None)
    n, total = len(images), cfg.total_steps(len(images))
    stop = total if max_steps is None else max(0, min(total, int(max_steps)))
    device = torch.device(device)
    model = build_detector(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    fingerprint = data_fingerprint(images, boxes, labels) if checkpoint_path is not None else None
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start = last_saved = None
    if ckpt is not None and resume and ckpt.exists():
        start = last_saved = _resume(ckpt, model, opt, cfg, fingerprint, total, say)
    start = start or 0
    if start < stop:
        say(f"training detector: {n} images, steps {start}..{stop} of {total} "
            f"({steps_per_epoch(n, cfg.batch_size)}/epoch, batch {cfg.batch_size})")
    bar = tqdm(total=stop, initial=min(start, stop), desc="detector", unit="step", disable=not progress or start >= stop)
    model.train()
    t0 = time.time()
    batches = _device_batches(images, boxes, labels, cfg, start, stop, device, next(model.parameters()).dtype, prefetch)
    try:
        for step, (x, t) in zip(range(start, stop), batches):
            lr = lr_at(step, total, cfg)
            loss, parts, gnorm = _train_step(model, opt, x, t, lr, cfg.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                raise _diverged(step, loss, parts, gnorm, cfg, ckpt, last_saved)
            _record_step(step, total, loss, parts, lr, gnorm, history, bar, say, log_every)
            if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < stop:
                _save(ckpt, step + 1, total, cfg, model, opt, fingerprint)
                last_saved = step + 1
    finally:
        bar.close()
        batches.close()
    if start < stop:
        _save(ckpt, stop, total, cfg, model, opt, fingerprint)
        say(f"detector training reached step {stop}/{total} in {time.time() - t0:.1f} s")
    return model.cpu().eval()


def finetune(
    model: CenterNet,
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    steps: int,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    augment: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    history: list | None = None,
    progress: bool = False,
) -> CenterNet:
    """Train ``model`` **in place** for ``steps`` AdamW steps at a constant learning rate, starting from its
    current weights (Neural-Sim's inner loop). Seeded by ``seed`` (shuffles, augmentation); the images
    are detached (no graph is kept).

    Args:
        lr: default ``0.1 * model.cfg.lr``; ignored when ``optimizer`` is given.
        batch_size: default ``model.cfg.batch_size`` (capped at ``len(images)``).
        augment: apply :func:`augment_batch` (off by default: the images are the rendered distribution).
        optimizer: an optimizer over ``model.parameters()`` to continue (keeps Adam's moments across calls);
            its ``lr`` is used as is.
        history: if given, ``{"step", "loss", "heatmap", "size", "offset"}`` per step is appended.

    Batches are drawn and encoded on the CPU and moved to the model's device.

    Returns:
        the same ``model``, in train mode as it was before the call.
    """
    cfg = model.cfg
    images = images.detach()
    _check_data(images, boxes, labels, cfg)
    bs = min(batch_size or cfg.batch_size, len(images))
    if optimizer is None:
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr if lr is not None else 0.1 * cfg.lr)
    was_training = model.training
    model.train()
    p0 = next(model.parameters())
    dtype, device = p0.dtype, p0.device
    cache: dict = {}
    aug_cfg = DetectorConfig.from_dict({**cfg.to_dict(), "seed": seed})
    try:
        for step in tqdm(range(steps), desc="finetune", unit="step", disable=not progress):
            idx = batch_indices(seed, step, len(images), bs, cache)
            x, t = make_batch(images, boxes, labels, idx, aug_cfg, step, augment, dtype)
            x, t = x.to(device), t.to(device)
            loss, parts = compute_loss(model(x), t, cfg)
            if not torch.isfinite(loss):
                raise DetectorTrainingError(f"fine-tuning diverged at step {step}: loss {float(loss.detach())}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if history is not None:
                history.append({"step": step, "loss": float(loss.detach()), **{k: parts[k] for k in ("heatmap", "size", "offset")}})
    finally:
        model.train(was_training)
    return model
