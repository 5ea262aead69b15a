"""Training batches of the detector: the seeded shuffle of each epoch, augmentation, target encoding, and a
prefetcher that builds the batches of later steps in threads while a GPU trains on earlier ones.

Every batch depends only on ``(seed, step)``: the shuffle of epoch ``e`` comes from a generator seeded with
``(seed, 1, e)`` and the augmentation of step ``k`` from ``(seed, 2, k)``.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch
import torch.nn.functional as F

from ..seeds import generator
from .config import DetectorConfig, steps_per_epoch
from .decode import as_float_images
from .targets import DetectionTargets, encode_targets

__all__ = ["BatchPrefetcher", "augment_batch", "batch_indices", "make_batch"]


def _epoch_perm(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=generator(seed, 1, epoch))


def batch_indices(seed: int, step: int, n: int, batch_size: int, cache: dict) -> torch.Tensor:
    """Image indices of step ``step``: the ``step``-th batch of the seeded epoch shuffles (``cache`` keeps the
    current epoch's permutation)."""
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


def make_batch(images: torch.Tensor, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], idx: torch.Tensor,
               cfg: DetectorConfig, step: int, aug: bool, dtype: torch.dtype) -> tuple[torch.Tensor, DetectionTargets]:
    """Images ``idx`` as float ``dtype`` with their encoded targets, augmented (seeded by ``(cfg.seed, step)``)
    when ``aug``; on the CPU."""
    x = as_float_images(images[idx]).to(dtype)
    bx = [boxes[i] for i in idx.tolist()]
    lb = [labels[i] for i in idx.tolist()]
    if aug:
        x, bx = augment_batch(x, bx, cfg, generator(cfg.seed, 2, step))
    t = encode_targets(bx, lb, tuple(x.shape[2:]), cfg.num_classes, cfg.stride, cfg.min_overlap, dtype=dtype)
    return x, t


class BatchPrefetcher:
    """Training batches of steps ``start..stop-1``, in step order, built ahead by ``workers`` threads while
    the GPU runs earlier steps.

    Why: on a GPU a training step of the gpu.yaml detector takes a few ms of GPU time, but drawing,
    augmenting and encoding its batch on the CPU took about 50 ms, so the GPU idled most of the time. Every
    batch depends only on ``(seed, step)`` (per-step generators; the epoch shuffles are drawn here, in the
    calling thread, in step order), so the batches are exactly those of the one-thread loop. Torch ops release
    the GIL, so the workers run in parallel with each other and with the training loop; each worker's ops use
    one OpenMP thread (OpenMP's thread count is per thread: a new thread would otherwise use every core).
    Images are put in pinned memory so that their copy to the GPU does not stall the loop."""

    def __init__(self, make: Callable, indices: Callable, start: int, stop: int, workers: int, pin: bool) -> None:
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
