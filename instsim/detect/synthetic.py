"""A procedural detection set for tests, benchmarks and smoke runs: 3 classes of flat shapes
(0 disk, 1 square, 2 cross) in random colours, sizes and positions on noisy gradient backgrounds.

Boxes are the shapes' tight xywh pixel boxes (pixel convention of :mod:`instsim.cameras`). Shapes may
partially occlude each other (placements overlapping an earlier box with IoU > 0.2 are redrawn).
"""

from __future__ import annotations

import torch

from .decode import box_iou

__all__ = ["SHAPE_NAMES", "make_shapes_dataset"]

SHAPE_NAMES = ("disk", "square", "cross")


def make_shapes_dataset(
    n: int,
    image_size: int = 64,
    max_objects: int = 3,
    min_size: float = 12.0,
    max_size: float = 28.0,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``n`` images with 1..``max_objects`` shapes each.

    Returns:
        images: ``(n, 3, S, S)`` float32 in ``[0, 1]``.
        boxes: per image ``(n_i, 4)`` float32 xywh pixels.
        labels: per image ``(n_i,)`` long in ``{0, 1, 2}`` (see :data:`SHAPE_NAMES`).
    """
    g = torch.Generator().manual_seed(seed)
    S = image_size
    pc = torch.arange(S, dtype=torch.float32) + 0.5  # pixel centres
    py, px = torch.meshgrid(pc, pc, indexing="ij")
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    images = torch.empty(n, 3, S, S)
    all_boxes, all_labels = [], []
    for i in range(n):
        # background: random linear colour gradient + pixel noise
        c0, c1 = u(3, 1, 1), u(3, 1, 1)
        ang = u(1) * 6.2832
        t = ((px * torch.cos(ang) + py * torch.sin(ang)) / S).clamp(0, 1)
        img = c0 * (1 - t) + c1 * t
        img = img + 0.06 * torch.randn(3, S, S, generator=g)
        bg_mean = img.mean(dim=(1, 2))
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            for _try in range(20):
                a = float(min_size + (max_size - min_size) * u(1))
                x0 = float(u(1) * (S - a))
                y0 = float(u(1) * (S - a))
                box = torch.tensor([[x0, y0, a, a]])
                if not boxes or float(box_iou(box, torch.stack(boxes)).max()) <= 0.2:
                    break
            else:
                continue
            cls = int(torch.randint(0, 3, (1,), generator=g))
            for _c in range(20):  # a colour that stands out from the background
                col = u(3)
                if float((col - bg_mean).abs().max()) > 0.35:
                    break
            cx, cy, r = x0 + a / 2, y0 + a / 2, a / 2
            if cls == 0:
                m = (px - cx) ** 2 + (py - cy) ** 2 <= r * r
            elif cls == 1:
                m = ((px - cx).abs() <= r) & ((py - cy).abs() <= r)
            else:
                arm = a / 6
                m = (((px - cx).abs() <= arm) & ((py - cy).abs() <= r)) | (((py - cy).abs() <= arm) & ((px - cx).abs() <= r))
            shade = col[:, None, None] * (0.85 + 0.15 * u(1, S, S))
            img = torch.where(m[None], shade, img)
            boxes.append(box[0])
            labels.append(cls)
        images[i] = img.clamp(0, 1)
        all_boxes.append(torch.stack(boxes).float() if boxes else torch.zeros(0, 4))
        all_labels.append(torch.tensor(labels, dtype=torch.long))
    return images, all_boxes, all_labels
