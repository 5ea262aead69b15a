"""Neural-Sim's training images: relaxed pose samples of every class rendered through the class's renderer.

A sample's randomness (Gumbel noise and jitter of the relaxed pose, principal-point shift, background) is drawn
once (:func:`draw_samples`) and stored, so that the images rendered without gradient for the detector's
fine-tuning (:func:`render_training_set`) are re-rendered identically with gradient through the poses to psi
(:func:`backprop_image_grad`). Rendering, compositing and boxes are :func:`instsim.synthesis.render_detection_images`,
the same path the strategies' training sets take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..poses import PoseSpace
from ..scene.backgrounds import random_backgrounds
from ..synthesis import DetectionCamera, Renderer, draw_shifts, render_detection_images, render_posed
from .distribution import PoseDistribution
from .sampling import RelaxedSample, draw_noise, relaxed_poses

__all__ = [
    "ClassRenderers",
    "ClassSamples",
    "TrainingSet",
    "backprop_image_grad",
    "draw_samples",
    "render_relaxed",
    "render_training_set",
]


@dataclass(frozen=True)
class ClassRenderers:
    """What renders each class's images: ``models`` (class -> NeRF, or anything ``renderer`` takes), the
    look-at ``centres`` (class -> ``(3,)`` world point, ``intrinsics.json``'s ``centre``), the detection
    ``camera``, the ``radii`` (class -> mean training-camera distance, ``intrinsics.json``'s ``radius.mean``: the
    world units of one unit of zoom) and the ``renderer`` (default: a NeRF, :func:`instsim.synthesis.render_posed`)."""

    models: Mapping[str, Any]
    centres: Mapping[str, torch.Tensor]
    camera: DetectionCamera
    radii: Mapping[str, float]
    renderer: Renderer = field(default=render_posed)

    @property
    def classes(self) -> list[str]:
        """Class names, sorted (the order of labels and of the target's COCO categories)."""
        return sorted(self.models)


@dataclass
class ClassSamples:
    """The stored randomness of ``n`` training images of one class: relaxed-pose noise, principal-point
    ``shifts (n, 2)`` in pixels and ``backgrounds (n, H, W, 3)``. Index it to take a chunk."""

    noise: RelaxedSample
    shifts: torch.Tensor
    backgrounds: torch.Tensor

    def __len__(self) -> int:
        return int(self.shifts.shape[0])

    def __getitem__(self, idx: slice | torch.Tensor) -> ClassSamples:
        return ClassSamples(self.noise[idx], self.shifts[idx], self.backgrounds[idx])


def draw_samples(
    space: PoseSpace, classes: Sequence[str], n: int, camera: DetectionCamera, generator: torch.Generator
) -> dict[str, ClassSamples]:
    """``n`` samples per class (in ``classes`` order, each: noise (:func:`draw_noise`), shifts
    (:func:`~instsim.synthesis.draw_shifts`), procedural backgrounds), all from ``generator``."""
    out = {}
    for c in classes:
        noise = draw_noise(space, n, generator)
        shifts = draw_shifts(n, camera.max_shift, generator)
        backgrounds = random_backgrounds(n, camera.size, generator)
        out[c] = ClassSamples(noise, shifts, backgrounds)
    return out


def _model_dtype_device(model: Any) -> tuple[torch.dtype, torch.device]:
    try:
        p = next(model.parameters())
        return p.dtype, p.device
    except (AttributeError, StopIteration):
        return torch.float32, torch.device("cpu")


def render_relaxed(
    renders: ClassRenderers,
    dist: PoseDistribution,
    cls: str,
    samples: ClassSamples,
    temperature: float,
    relaxation: str,
    requires_grad: bool = False,
    box_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render the relaxed samples of class ``cls`` over their stored backgrounds.

    The poses are :func:`~instsim.neuralsim.sampling.relaxed_poses` (about the origin, at zoom times the class's
    training-camera distance) moved to look at the class's centre. Same ``samples`` and same psi give the same
    images with and without gradient.

    Args:
        requires_grad: build the graph from the images back to ``dist``'s logits (through the renderer).
        box_grad: with ``requires_grad``, boxes that carry the gradient too
            (:func:`~instsim.scene.backgrounds.soft_boxes`; the same boxes forward).
        temperature, relaxation: see :func:`~instsim.neuralsim.sampling.relaxed_pose_values`.

    Returns:
        ``images (n, 3, H, W)`` in [0, 1] on the renderer's device, and ``boxes (n, 4)`` (COCO xywh pixels,
        detached, on the CPU; with ``box_grad`` differentiable, on the renderer's device); an image showing
        nothing has a zero box.
    """
    model = renders.models[cls]
    dtype, device = _model_dtype_device(model)
    with torch.set_grad_enabled(requires_grad):
        _, c2w = relaxed_poses(dist, cls, samples.noise, temperature, relaxation=relaxation,
                               class_radius=float(renders.radii[cls]))
        offset = torch.zeros(4, 4, dtype=c2w.dtype, device=c2w.device)
        offset[:3, 3] = torch.as_tensor(renders.centres[cls], dtype=c2w.dtype, device=c2w.device)
        c2w = (c2w + offset).to(device=device, dtype=dtype)  # translate eye and target by the centre
        rgb, boxes = render_detection_images(model, c2w, renders.camera, samples.shifts, samples.backgrounds,
                                             renders.renderer, requires_grad, box_grad=box_grad and requires_grad)
        images = rgb.permute(0, 3, 1, 2)
    return (images if requires_grad else images.detach()), boxes


@dataclass
class TrainingSet:
    """The rendered training images of one iteration (on the CPU, for the detector) and which stored sample
    each came from: ``index[cls]`` the visible samples of that class, in the order they appear in ``images``."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    index: dict[str, torch.Tensor]


def render_training_set(
    renders: ClassRenderers,
    dist: PoseDistribution,
    samples: Mapping[str, ClassSamples],
    temperature: float,
    relaxation: str,
) -> TrainingSet:
    """Render every class's samples without gradient; keep the images whose object is visible (a non-empty
    box), labelled by the class's index in ``dist.classes``."""
    images, boxes, labels, index = [], [], [], {}
    for k, c in enumerate(dist.classes):
        with torch.no_grad():
            imgs, bx = render_relaxed(renders, dist, c, samples[c], temperature, relaxation)
        visible = ((bx[:, 2] > 0) & (bx[:, 3] > 0)).nonzero().flatten()
        index[c] = visible
        images.append(imgs.float().cpu()[visible])
        boxes += [bx[i][None] for i in visible.tolist()]
        labels += [torch.tensor([k], dtype=torch.long) for _ in visible.tolist()]
    return TrainingSet(torch.cat(images), boxes, labels, index)


def backprop_image_grad(
    renders: ClassRenderers,
    dist: PoseDistribution,
    samples: Mapping[str, ClassSamples],
    train: TrainingSet,
    image_grad: torch.Tensor,
    temperature: float,
    relaxation: str,
    chunk: int,
    box_grad: torch.Tensor | None = None,
) -> None:
    """Re-render the visible stored samples with gradient, ``chunk`` images at a time, and backpropagate
    ``image_grad`` (``(n, 3, H, W)``, aligned with ``train.images``) and, when given, ``box_grad`` (``(n, 4)``, the
    gradient with respect to each image's box, through :func:`~instsim.scene.backgrounds.soft_boxes` of the
    re-rendered opacity) into ``dist``'s logits' ``.grad`` (accumulated; nothing is computed for, or left on, the
    NeRFs' weights)."""
    start = 0
    for c in dist.classes:
        idx = train.index[c]
        params = [p for p in dist.learned_parameters(c).values() if p.requires_grad]
        for s in range(0, len(idx), chunk):
            part = idx[s:s + chunk]
            imgs, boxes = render_relaxed(renders, dist, c, samples[c][part], temperature, relaxation, requires_grad=True,
                                         box_grad=box_grad is not None)
            rows = slice(start + s, start + s + len(part))
            outputs, grads_out = [imgs], [image_grad[rows].to(device=imgs.device, dtype=imgs.dtype)]
            if box_grad is not None and boxes.requires_grad:
                outputs.append(boxes)
                grads_out.append(box_grad[rows].to(device=boxes.device, dtype=boxes.dtype))
            grads = torch.autograd.grad(outputs, params, grad_outputs=grads_out, allow_unused=True)
            for p, gp in zip(params, grads):
                if gp is not None:
                    p.grad = gp.detach() if p.grad is None else p.grad + gp.detach()
        start += len(idx)
