"""Seeded, checkpointed, resumable detector training, and a short fine-tune for Neural-Sim's inner loop.

Determinism: the weights depend only on the data and the :class:`~.config.DetectorConfig`. The shuffle of
epoch ``e`` and the augmentation of step ``k`` come from generators seeded with ``(cfg.seed, e)`` and
``(cfg.seed, k)``, and the learning rate is a pure function of the step, so a run resumed from a
checkpoint ends with the same weights (bit for bit on the same CPU and thread count) as an
uninterrupted run.

Checkpoints (``torch.save`` dicts, written atomically: tmp file + ``os.replace``) hold ``step``,
``total_steps``, ``config``, ``model``, ``optimizer``, ``rng`` (the global torch RNG state) and a
fingerprint of the training data; resuming with another config or other data is refused.
A non-finite loss or gradient stops training with :class:`DetectorTrainingError`; the last checkpoint
written (a good one) is kept.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import load_torch, save_torch
from ..errors import ConfigError, InputError, InstsimError
from ..seeds import generator
from .config import DetectorConfig, steps_per_epoch
from .decode import as_float_images
from .loss import compute_loss
from .model import CenterNet, build_detector
from .targets import encode_targets

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

CHECKPOINT_FORMAT = "instsim-detector-v1"


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


def _epoch_perm(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=generator(seed, 1, epoch))


def _batch_indices(seed: int, step: int, n: int, batch_size: int, cache: dict) -> torch.Tensor:
    spe = steps_per_epoch(n, batch_size)
    epoch, k = divmod(step, spe)
    if cache.get("epoch") != epoch:
        cache["epoch"], cache["perm"] = epoch, _epoch_perm(seed, epoch, n)
    return cache["perm"][k * batch_size:(k + 1) * batch_size]


def augment_batch(
    images: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    cfg: DetectorConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random integer translation (edge-replicated border, boxes follow, up to ``cfg.aug_shift`` px),
    per-channel gain / brightness / contrast jitter (``cfg.aug_color``) and Gaussian pixel noise
    (``cfg.aug_noise``). No flips (they change a hand's chirality).

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]``.
        boxes: per image ``(n_i, 4)`` xywh pixels.

    Returns:
        augmented images (clamped to ``[0, 1]``) and shifted boxes (clipping is left to the encoder).
    """
    B, _, H, W = images.shape
    out_boxes = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    s = cfg.aug_shift
    if s > 0:
        shifts = torch.randint(-s, s + 1, (B, 2), generator=generator)
        padded = F.pad(images, (s, s, s, s), mode="replicate")
        rows = []
        for b in range(B):
            dx, dy = int(shifts[b, 0]), int(shifts[b, 1])
            rows.append(padded[b, :, s - dy:s - dy + H, s - dx:s - dx + W])
            out_boxes[b] = out_boxes[b] + torch.tensor([dx, dy, 0.0, 0.0])
        images = torch.stack(rows)
    c = cfg.aug_color
    if c > 0:
        u = lambda *shape: 2 * torch.rand(*shape, generator=generator) - 1  # noqa: E731  U(-1, 1)
        gain = 1 + c * u(B, 3, 1, 1)
        bright = 0.5 * c * u(B, 1, 1, 1)
        contrast = 1 + c * u(B, 1, 1, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images * gain - mean) * contrast + mean + bright
    if cfg.aug_noise > 0:
        sigma = cfg.aug_noise * torch.rand(B, 1, 1, 1, generator=generator)
        images = images + sigma * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1), out_boxes


def data_fingerprint(images: torch.Tensor, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> str:
    """sha1 of the training data (images, boxes, labels), to refuse resuming on other data."""
    h = hashlib.sha1()
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(np.ascontiguousarray(torch.as_tensor(images).detach().cpu().numpy()).tobytes())
    for b, lb in zip(boxes, labels):
        h.update(np.ascontiguousarray(torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4).numpy()).tobytes())
        h.update(np.ascontiguousarray(torch.as_tensor(lb, dtype=torch.long).reshape(-1).numpy()).tobytes())
    return h.hexdigest()


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
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)  # no decay on biases and GroupNorm affine params
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _read_checkpoint(path: Path) -> dict:
    ck = load_torch(path, CHECKPOINT_FORMAT, "an instsim detector checkpoint")
    for key in ("config", "model"):
        if key not in ck:
            raise InputError(path, key, "missing from the detector checkpoint")
    return ck


def save_detector(model: CenterNet, path: str | Path) -> None:
    """Write the model's config and weights (atomically); read back with :func:`load_detector`."""
    save_torch({"format": CHECKPOINT_FORMAT, "config": model.cfg.to_dict(), "model": model.state_dict(),
                  "complete": True}, Path(path))


def load_detector(path: str | Path) -> CenterNet:
    """A detector from :func:`save_detector` output or a training checkpoint (config + weights)."""
    path = Path(path)
    ck = _read_checkpoint(path)
    cfg = DetectorConfig.from_dict(ck["config"], source=path)
    model = CenterNet(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise InputError(path, "model", f"weights do not fit the config: {e}") from None
    return model


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


def _batch(images, boxes, labels, idx, cfg, step, aug: bool, dtype):
    x = as_float_images(images[idx]).to(dtype)
    bx = [boxes[i] for i in idx.tolist()]
    lb = [labels[i] for i in idx.tolist()]
    if aug:
        x, bx = augment_batch(x, bx, cfg, generator(cfg.seed, 2, step))
    t = encode_targets(bx, lb, tuple(x.shape[2:]), cfg.num_classes, cfg.stride, cfg.min_overlap, dtype=dtype)
    return x, t


class _BatchPrefetcher:
    """Training batches of steps ``start..stop-1``, in step order, built ahead by ``workers`` threads while
    the GPU runs earlier steps.

    Why: on a GPU a training step of the gpu.yaml detector takes a few ms of GPU time, but drawing,
    augmenting and encoding its batch on the CPU took about 50 ms, so the GPU idled most of the time. Every
    batch depends only on ``(seed, step)`` (per-step generators; the epoch shuffles are drawn here, in the
    calling thread, in step order), so the batches are exactly those of the one-thread loop. Torch ops release
    the GIL, so the workers run in parallel with each other and with the training loop; each worker's ops use
    one OpenMP thread (OpenMP's thread count is per thread: a new thread would otherwise use every core).
    Images are put in pinned memory so that their copy to the GPU does not stall the loop."""

    def __init__(self, make, indices, start: int, stop: int, workers: int, pin: bool) -> None:
        import queue
        import threading
        from collections import deque

        self._make, self._indices, self._pin = make, indices, pin
        self._jobs: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        self._next, self._stop = start, stop
        workers = max(1, int(workers))
        ready = threading.Barrier(workers + 1)
        main_threads = torch.get_num_threads()

        def work() -> None:
            torch.set_num_threads(1)
            ready.wait()
            while True:
                item = self._jobs.get()
                if item is None:
                    return
                fut, idx, step = item
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(self._build(idx, step))
                except BaseException as e:  # handed to the training loop by fut.result()
                    fut.set_exception(e)

        self._threads = [threading.Thread(target=work, name="detector-batches", daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()
        ready.wait()
        torch.set_num_threads(main_threads)  # set_num_threads(1) above also changed the process-wide default
        for _ in range(2 * workers):
            self._submit()

    def _submit(self) -> None:
        from concurrent.futures import Future

        if self._next < self._stop:
            fut: Future = Future()
            self._jobs.put((fut, self._indices(self._next), self._next))
            self._pending.append(fut)
            self._next += 1

    def _build(self, idx, step):
        x, t = self._make(idx, step)
        return (x.pin_memory() if self._pin else x), t

    def get(self):
        """The next step's ``(images, targets)``."""
        fut = self._pending.popleft()
        self._submit()
        return fut.result()

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()


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
        old_threads = torch.get_num_threads()
        torch.set_num_threads(int(num_threads))
        try:
            return train_detector(images, boxes, labels, cfg, log, checkpoint_path, resume, max_steps, progress,
                                  log_every, history, None, device, prefetch)
        finally:
            torch.set_num_threads(old_threads)
    say = log or (lambda msg: None)
    n = len(images)
    total = cfg.total_steps(n)
    stop = total if max_steps is None else max(0, min(total, int(max_steps)))
    device = torch.device(device)
    model = build_detector(cfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    fingerprint = data_fingerprint(images, boxes, labels) if checkpoint_path is not None else None
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    start = 0
    last_saved: int | None = None
    if ckpt is not None and resume and ckpt.exists():
        ck = _read_checkpoint(ckpt)
        saved = ck["config"]
        now = cfg.to_dict()
        for key in sorted(set(saved) | set(now)):
            if saved.get(key) != now.get(key):
                raise ConfigError(ckpt, f"config.{key}", f"checkpoint was made with {saved.get(key)!r}, the config says "
                                  f"{now.get(key)!r}; delete the checkpoint or train with resume=False")
        if ck.get("data") != fingerprint:
            raise InputError(ckpt, "data", "checkpoint was trained on other images/boxes/labels; delete it or train with resume=False")
        model.load_state_dict(ck["model"])
        if "optimizer" in ck:
            opt.load_state_dict(ck["optimizer"])
        if "rng" in ck:
            torch.set_rng_state(ck["rng"])
        start = last_saved = int(ck.get("step", total))
        say(f"resumed detector training from {ckpt} at step {start}/{total}")
    dtype = next(model.parameters()).dtype

    def save(step: int) -> None:
        if ckpt is None:
            return
        save_torch({"format": CHECKPOINT_FORMAT, "step": step, "total_steps": total, "complete": step >= total,
                      "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "rng": torch.get_rng_state(), "data": fingerprint}, ckpt)

    if start < stop:
        say(f"training detector: {n} images, steps {start}..{stop} of {total} "
            f"({steps_per_epoch(n, cfg.batch_size)}/epoch, batch {cfg.batch_size})")
    bar = tqdm(total=stop, initial=min(start, stop), desc="detector", unit="step", disable=not progress or start >= stop)
    model.train()
    cache: dict = {}
    t0 = time.time()
    indices = lambda step: _batch_indices(cfg.seed, step, n, cfg.batch_size, cache)  # noqa: E731
    make = lambda idx, step: _batch(images, boxes, labels, idx, cfg, step, True, dtype)  # noqa: E731
    # on a GPU the batches are built ahead in threads (the same batches); on a CPU that would only take cores
    # from the training step itself
    prefetch = (
        _BatchPrefetcher(make, indices, start, stop, workers=max(1, torch.get_num_threads()), pin=True)
        if prefetch and device.type == "cuda" and start < stop else None
    )
    try:
        for step in range(start, stop):
            if prefetch is not None:
                x, t = prefetch.get()
                x, t = x.to(device, non_blocking=True), t.to(device)
            else:
                x, t = make(indices(step), step)
                x, t = x.to(device), t.to(device)
            lr = lr_at(step, total, cfg)
            loss, parts, gnorm = _train_step(model, opt, x, t, lr, cfg.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                where = f"; last good checkpoint: {ckpt} (step {last_saved})" if last_saved is not None else ""
                raise DetectorTrainingError(
                    f"detector training diverged at step {step}: loss {loss} (heatmap {parts['heatmap']:.4g}, size "
                    f"{parts['size']:.4g}, offset {parts['offset']:.4g}), gradient norm {gnorm}; try a lower lr "
                    f"(now {cfg.lr}){where}")
            if history is not None:
                history.append({"step": step, "loss": loss, **{k: parts[k] for k in ("heatmap", "size", "offset")},
                                "lr": lr, "grad_norm": gnorm})
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
            if log_every and (step + 1) % log_every == 0:
                say(f"step {step + 1}/{total} loss {loss:.4f} (heatmap {parts['heatmap']:.4f} size {parts['size']:.4f} "
                    f"offset {parts['offset']:.4f}) lr {lr:.2e}")
            if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < stop:
                save(step + 1)
                last_saved = step + 1
    finally:
        bar.close()
        if prefetch is not None:
            prefetch.close()
    if start < stop:
        save(stop)
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
            idx = _batch_indices(seed, step, len(images), bs, cache)
            x, t = _batch(images, boxes, labels, idx, aug_cfg, step, augment, dtype)
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
