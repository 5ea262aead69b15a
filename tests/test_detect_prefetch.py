"""The GPU detector loop builds its batches ahead in threads (instsim.detect.batches.BatchPrefetcher): the batches
must be exactly those of the one-thread loop, in step order, and a failing batch must surface in the loop."""

import pytest
import torch

from instsim.detect.config import DetectorConfig
from instsim.detect.batches import BatchPrefetcher, batch_indices, make_batch


def _data(n=40, size=32):
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, size, size, generator=gen) * 255).to(torch.uint8)
    boxes = [torch.tensor([[4.0 + i % 7, 5.0, 12.0, 14.0]]) for i in range(n)]
    labels = [torch.tensor([i % 3]) for i in range(n)]
    cfg = DetectorConfig.from_dict({"image_size": size, "batch_size": 8, "seed": 3}, source="test")
    return images, boxes, labels, cfg


def test_prefetched_batches_are_the_sequential_ones():
    images, boxes, labels, cfg = _data()
    make = lambda idx, step: make_batch(images, boxes, labels, idx, cfg, step, True, torch.float32)  # noqa: E731
    seq_cache, pre_cache = {}, {}
    expected = [make(batch_indices(cfg.seed, s, len(images), cfg.batch_size, seq_cache), s) for s in range(3, 17)]
    threads = torch.get_num_threads()
    pre = BatchPrefetcher(make, lambda s: batch_indices(cfg.seed, s, len(images), cfg.batch_size, pre_cache),
                           3, 17, workers=3, pin=False)
    assert torch.get_num_threads() == threads  # the workers' one-thread setting does not leak into the loop
    try:
        for x_ref, t_ref in expected:
            x, t = pre.get()
            assert torch.equal(x, x_ref)
            for name in t_ref._fields:
                assert torch.equal(getattr(t, name), getattr(t_ref, name)), name
    finally:
        pre.close()


def test_a_failing_batch_is_raised_in_the_loop():
    def make(idx, step):
        if step == 2:
            raise ValueError("bad batch 2")
        return torch.zeros(1), torch.zeros(1)

    pre = BatchPrefetcher(make, lambda s: s, 0, 5, workers=2, pin=False)
    try:
        pre.get(), pre.get()
        with pytest.raises(ValueError, match="bad batch 2"):
            pre.get()
    finally:
        pre.close()
