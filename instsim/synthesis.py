"""Detection images synthesized from a renderer: render at poses, composite over backgrounds, box the object.

The one path from "a class's renderer and some camera poses" to "detection images with boxes". The strategies'
training sets (:func:`make_synthetic_set`, what ``train_detector`` trains on) and Neural-Sim's relaxed samples
(:mod:`instsim.neuralsim.samples`, what the loop optimizes) both go through :func:`render_detection_images`,
so the ``neuralsim`` strategy trains on the same kind of image the loop steered.

Conventions: images ``(n, H, W, 3)`` float in [0, 1]; renderers return premultiplied RGB + opacity
``(n, H, W, 4)``; boxes ``(n, 4)`` COCO ``[x, y, w, h]`` in pixels around ``opacity > BOX_OPACITY``, zeros when
nothing is visible. The camera is the target domain's (:class:`DetectionCamera`); each image's principal point
is shifted by whole pixels so objects sit off-centre, as in the target domain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .cameras import Intrinsics, pixel_centres

from .poses import PoseSpace
from .nerf.rendering import render
from .scene.backgrounds import BOX_OPACITY, boxes_from_alpha, composite_premultiplied, random_backgrounds, soft_boxes
from .seeds import class_seed

__all__ = [
    "BOX_OPACITY",
    "DetectionCamera",
    "Renderer",
    "SynthSet",
    "draw_shifts",
    "make_synthetic_set",
    "render_detection_images",
    "render_posed",
]

#: ``(model, c2w (n, 4, 4), intrinsics, shifts (n, 2) pixels, requires_grad) -> (n, H, W, 4)`` premultiplied
#: RGB + opacity; the default is :func:`render_posed` (a NeRF).
Renderer = Callable[[Any, torch.Tensor, Intrinsics, torch.Tensor, bool], torch.Tensor]


@dataclass(frozen=True)
class DetectionCamera:
    """The detection camera of the target domain: square ``intrinsics`` and the largest principal-point shift
    ``max_shift`` in pixels."""

    intrinsics: Intrinsics
    max_shift: float

    @property
    def size(self) -> int:
        """Image side in pixels."""
        return int(self.intrinsics.w)

    @classmethod
    def from_target_config(cls, target_cfg: Mapping[str, Any]) -> DetectionCamera:
        """From the config's ``target`` section: ``image_size`` (px), ``fov_deg`` and ``max_shift`` (a fraction
        of the image size)."""
        size = int(target_cfg["image_size"])
        intr = Intrinsics.from_fov(size, size, math.radians(float(target_cfg["fov_deg"])))
        return cls(intr, float(target_cfg["max_shift"]) * size)


def draw_shifts(n: int, max_shift: float, generator: torch.Generator) -> torch.Tensor:
    """``(n, 2)`` whole-pixel principal-point shifts, uniform in ``[-max_shift, max_shift]`` then rounded."""
    return ((torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift).round()


@dataclass
class SynthSet:
    """A detection set: ``images`` ``(N, H, W, 3)`` float in [0, 1], ``boxes`` ``(N, 4)`` COCO xywh pixels,
    ``labels`` ``(N,)`` 0-based indices into ``class_names`` (sorted, as the target's COCO categories)."""

    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def render_posed(
    model: torch.nn.Module, poses: torch.Tensor, intr: Intrinsics, shifts: torch.Tensor, requires_grad: bool = False
) -> torch.Tensor:
    """Render a NeRF at ``poses`` ``(n, 4, 4)`` with per-image principal-point ``shifts`` ``(n, 2)`` (pixels).

    Returns premultiplied RGB + opacity ``(n, H, W, 4)``; differentiable to ``poses`` when asked. All images go
    to the renderer in one batch of rays (it chunks them to bound memory): one call per image left a GPU idle
    between the small calls.
    """
    n = poses.shape[0]
    # moving the principal point by (du, dv) moves the image content by the same amount: pixel (u, v) of the
    # shifted camera sees what pixel (u - du, v - dv) of the unshifted one sees
    base = pixel_centres(intr).reshape(1, -1, 2)
    uv = base - shifts.to(base.dtype)[:, None, :]
    r = render(model, poses, intr, background=None, requires_grad=requires_grad, uv=uv)
    return torch.cat([r["rgb"], r["opacity"][..., None]], dim=-1).reshape(n, intr.h, intr.w, 4)


def render_detection_images(
    model: Any,
    poses: torch.Tensor,
    camera: DetectionCamera,
    shifts: torch.Tensor,
    backgrounds: torch.Tensor,
    renderer: Renderer = render_posed,
    requires_grad: bool = False,
    box_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``model`` at ``poses`` ``(n, 4, 4)`` (already in the model's dtype and device), composite over
    ``backgrounds`` ``(n, H, W, 3)`` and box the object.

    Args:
        box_grad: with ``requires_grad``, return boxes that carry the pose gradient too
            (:func:`~instsim.scene.backgrounds.soft_boxes`: the same integer boxes forward).

    Returns:
        ``images (n, H, W, 3)`` in [0, 1] on the renderer's device (differentiable to ``poses`` when
        ``requires_grad``), and ``boxes (n, 4)``: float32 on the CPU, detached (zeros: nothing visible), or with
        ``box_grad`` in the render's dtype and device, differentiable.
    """
    with torch.set_grad_enabled(requires_grad):
        rgba = renderer(model, poses, camera.intrinsics, shifts, requires_grad)
        bg = backgrounds.to(device=rgba.device, dtype=rgba.dtype)
        images = composite_premultiplied(rgba, bg).clamp(0, 1)
        if box_grad:
            return images, soft_boxes(rgba[..., 3], BOX_OPACITY)
    boxes = boxes_from_alpha(rgba[..., 3].detach().float().cpu(), BOX_OPACITY)
    return images, boxes


def make_synthetic_set(
    models: Mapping[str, torch.nn.Module],
    centres: Mapping[str, torch.Tensor],
    probs: Mapping[str, Mapping[str, torch.Tensor]],
    space: PoseSpace,
    camera: DetectionCamera,
    n_per_class: int,
    seed: int,
    *,
    radii: Mapping[str, float],
) -> SynthSet:
    """Render ``n_per_class`` images of every class from its NeRF (no gradient), keeping those that show
    their object.

    Args:
        models: class name -> trained NeRF (on its device).
        centres: class name -> ``(3,)`` world point the cameras look at (``intrinsics.json``'s ``centre``).
        radii: class name -> mean training-camera distance (``intrinsics.json``'s ``radius.mean``): the world
            units of one unit of zoom.
        probs: class name -> ``{factor: (bins,)}`` pose distribution to draw from.
        space: the binned pose space.
        camera: the detection camera.
        seed: seeds poses, shifts and backgrounds (a stream apart from the target domain's).
    """
    names = sorted(models)
    images, boxes, labels = [], [], []
    for k, name in enumerate(names):
        gen = torch.Generator().manual_seed(class_seed(seed, name, "synthetic"))
        sample = space.sample(probs[name], n_per_class, gen)
        centre = torch.as_tensor(centres[name], dtype=torch.float64)
        poses = sample.poses(float(radii[name]), centre)
        shifts = draw_shifts(n_per_class, camera.max_shift, gen)
        backgrounds = random_backgrounds(n_per_class, camera.size, gen)
        rgb, box = render_detection_images(models[name], poses, camera, shifts, backgrounds)
        rgb = rgb.cpu()
        visible = (box[:, 2] > 0) & (box[:, 3] > 0)  # a pose that shows nothing would teach "no object here"
        images.append(rgb[visible])
        boxes.append(box[visible])
        labels.append(torch.full((int(visible.sum()),), k, dtype=torch.long))
    return SynthSet(torch.cat(images), torch.cat(boxes), torch.cat(labels), names)
