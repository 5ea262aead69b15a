"""Synthetic detection sets rendered from the class NeRFs at poses drawn from a pose distribution.

This is what the detector of every strategy trains on: ``n`` images per class, the NeRF's rendering at a
sampled pose (off-centre like the target domain) composited over procedural backgrounds of the same kind
as the target's but from another seed, and a box around the rendered opacity. The camera (image size and
field of view) is the target domain's, so only the pose distribution differs between strategies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .scene.backgrounds import boxes_from_alpha, random_backgrounds
from .cameras import Intrinsics, PoseSpace, pose_from_spherical
from .seeds import class_seed

__all__ = ["SynthSet", "detection_intrinsics", "render_posed", "make_synthetic_set", "BOX_OPACITY"]

#: opacity above which a rendered pixel counts as object for its box (the target uses the same on alpha)
BOX_OPACITY = 0.5


@dataclass
class SynthSet:
    """A detection set: ``images`` ``(N, H, W, 3)`` float in [0, 1], ``boxes`` ``(N, 4)`` COCO xywh pixels,
    ``labels`` ``(N,)`` 0-based indices into ``class_names`` (sorted, as the target's COCO categories)."""

    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def detection_intrinsics(target_cfg: Mapping[str, Any]) -> Intrinsics:
    """The detection camera (the target domain's): square ``image_size``, ``fov_deg``."""
    size = int(target_cfg["image_size"])
    return Intrinsics.from_fov(size, size, math.radians(float(target_cfg["fov_deg"])))


def render_posed(
    model: torch.nn.Module, poses: torch.Tensor, intr: Intrinsics, shifts: torch.Tensor, requires_grad: bool = False
) -> torch.Tensor:
    """Render ``poses`` ``(n, 4, 4)`` with per-image principal-point ``shifts`` ``(n, 2)`` (pixels).

    Returns premultiplied RGB + opacity ``(n, H, W, 4)``; differentiable to ``poses`` when asked.
    """
    from .nerf.rendering import render

    out = []
    for pose, (du, dv) in zip(poses, shifts.tolist()):
        r = render(model, pose, intr.shifted(du, dv), background=None, requires_grad=requires_grad)
        out.append(torch.cat([r["rgb"], r["opacity"][..., None]], dim=-1))
    return torch.stack(out)


def make_synthetic_set(
    models: Mapping[str, torch.nn.Module],
    centres: Mapping[str, torch.Tensor],
    probs: Mapping[str, Mapping[str, torch.Tensor]],
    space: PoseSpace,
    target_cfg: Mapping[str, Any],
    n_per_class: int,
    seed: int,
) -> SynthSet:
    """Render ``n_per_class`` images of every class from its NeRF.

    Args:
        models: class name -> trained NeRF (on its device).
        centres: class name -> ``(3,)`` world point the cameras look at (``intrinsics.json``'s ``centre``).
        probs: class name -> ``{factor: (bins,)}`` pose distribution to draw from.
        space: the binned pose space.
        target_cfg: the config's ``target`` section (camera, ``max_shift``).
        seed: seeds poses, shifts and backgrounds (a stream apart from the target domain's).
    """
    names = sorted(models)
    intr = detection_intrinsics(target_cfg)
    size = intr.w
    max_shift = float(target_cfg["max_shift"]) * size
    images, boxes, labels = [], [], []
    for k, name in enumerate(names):
        gen = torch.Generator().manual_seed(class_seed(seed, name, "synthetic"))
        sample = space.sample(probs[name], n_per_class, gen)
        centre = torch.as_tensor(centres[name], dtype=torch.float64)
        poses = pose_from_spherical(
            torch.deg2rad(sample.azimuth_deg), torch.deg2rad(sample.elevation_deg), sample.radius, centre
        ).float()
        shifts = ((torch.rand(n_per_class, 2, generator=gen) * 2 - 1) * max_shift).round()
        rgba = render_posed(models[name], poses, intr, shifts).cpu()
        backgrounds = random_backgrounds(n_per_class, size, gen)
        opacity = rgba[..., 3:4]
        # the NeRF's rgb is premultiplied: composite = rgb + (1 - opacity) * background
        rgb = (rgba[..., :3] + (1 - opacity) * backgrounds).clamp(0, 1)
        box = boxes_from_alpha(rgba[..., 3], BOX_OPACITY)
        visible = (box[:, 2] > 0) & (box[:, 3] > 0)  # a pose that shows nothing would teach "no object here"
        images.append(rgb[visible])
        boxes.append(box[visible])
        labels.append(torch.full((int(visible.sum()),), k, dtype=torch.long))
    return SynthSet(torch.cat(images), torch.cat(boxes), torch.cat(labels), names)
