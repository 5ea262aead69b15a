"""The ``render_target`` stage: the detection target domain, with COCO annotations.

One object per image, its pose drawn from the *target* pose distribution (which Neural-Sim does not see;
only the images of the ``val`` split steer it), moved off-centre by a random principal-point shift and
composited over a procedural background. Boxes are tight around the rendered alpha mask.

Procedural classes are rendered by the ground-truth hand renderer at the sampled pose. Folder classes
(no renderer for new poses) draw views from the dataset's own val/test images, each view weighted by the
target probability of the pose bin it falls in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..scene.backgrounds import BOX_OPACITY, boxes_from_alpha, composite, random_backgrounds
from ..cameras import Intrinsics, spherical_from_pose
from ..poses import PoseSpace
from ..seeds import class_seed
from ..synthesis import DetectionCamera, draw_shifts
from ..errors import InputError
from .intrinsics import look_at_centre
from ..io import atomic_dir, write_json, write_png
from ..scene import make_hand, render_scene
from ..transforms import load_views, read_transforms

__all__ = ["render_target", "coco_categories"]

log = logging.getLogger(__name__)

def coco_categories(class_names: list[str]) -> list[dict]:
    """COCO categories of the classes in sorted name order (ids from 1), so that reordering the config's
    classes does not renumber them."""
    return [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(sorted(class_names))]


def _procedural_renderer(
    gesture: str, supersample: int, device: str | torch.device = "cpu"
) -> Callable[[torch.Tensor, Intrinsics], torch.Tensor]:
    scene = make_hand(gesture).to(device)
    return lambda c2w, intr: render_scene(scene, c2w[None], intr, supersample=supersample)[0].cpu()


class _FolderViews:
    """Views of a folder class, picked by the target probability of their pose bin.

    A view's zoom is its camera distance over the class's mean training-camera distance (``radius``), as for
    every class. Views whose elevation or zoom falls outside the pose space's bins get no weight (they are not
    clamped into the end bins, which would give them a probability they do not have); ``outside`` counts them
    per factor, and :func:`render_target` logs and records the counts.
    """

    def __init__(self, path: Path, space: PoseSpace, probs: Mapping[str, torch.Tensor], size: int, radius: float) -> None:
        views, poses = [], []
        for split in ("test", "val"):
            tf_path = path / f"transforms_{split}.json"
            if tf_path.is_file():
                v = load_views(tf_path, read_transforms(tf_path))
                views.append(v.images)
                poses.append(v.poses)
        if not views:
            raise InputError(path, "transforms_test.json", "a folder class needs val or test views for the target domain")
        images = torch.cat(views)
        self.poses = torch.cat(poses)
        az, el, r = spherical_from_pose(self.poses.double(), look_at_centre(self.poses))
        weight = torch.ones(len(images), dtype=torch.float64)
        inside = torch.ones(len(images), dtype=torch.bool)
        self.outside: dict[str, int] = {}
        for name, value in (("azimuth", torch.rad2deg(az) % 360), ("elevation", torch.rad2deg(el)), ("zoom", r / radius)):
            f = space.factor(name)
            idx = ((value - f.low) / f.width).floor().long()
            ok = (idx >= 0) & (idx < f.bins)
            if name == "azimuth" and abs(f.high - f.low - 360.0) < 1e-9:
                ok = torch.ones_like(ok)  # a full turn: every angle is in a bin (mod 360 above)
            self.outside[name] = int((~ok).sum())
            inside &= ok
            weight = weight * torch.where(ok, probs[name][idx.clamp(0, f.bins - 1)], torch.zeros_like(weight))
        self.outside["total"] = int((~inside).sum())
        self.n_views = len(images)
        if not weight.sum() > 0:
            raise InputError(path, "frames", f"no view falls in a pose bin the target distribution gives weight to "
                             f"(views outside the bins: {self.outside} of {len(images)}; zoom is the camera distance over "
                             f"the training cameras' mean, {radius:.4g})")
        self.weight = weight
        self.images = _square_resize(images, size)

    def draw(self, gen: torch.Generator) -> torch.Tensor:
        i = int(torch.multinomial(self.weight, 1, generator=gen))
        return self.images[i]


def _square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop ``(N, H, W, C)`` to square and resize to ``size`` (area filter)."""
    n, h, w, c = images.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = images[:, top : top + s, left : left + s].permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="area" if s > size else "bilinear", align_corners=None if s > size else False)
    return x.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


def _shift_image(rgba: torch.Tensor, du: int, dv: int) -> torch.Tensor:
    """Translate ``(H, W, 4)`` by whole pixels, filling with transparent pixels."""
    out = torch.zeros_like(rgba)
    h, w = rgba.shape[:2]
    ys, yd = (slice(0, h - dv), slice(dv, h)) if dv >= 0 else (slice(-dv, h), slice(0, h + dv))
    xs, xd = (slice(0, w - du), slice(du, w)) if du >= 0 else (slice(-du, w), slice(0, w + du))
    out[yd, xd] = rgba[ys, xs]
    return out


def _class_renderers(classes: Mapping[str, Mapping[str, Any]], space: PoseSpace, probs: Mapping[str, torch.Tensor],
                     size: int, supersample: int, device: str | torch.device, radii: Mapping[str, float],
                     split: str) -> dict[str, Any]:
    """class -> the hand renderer (procedural) or its views picked by target probability (folder; views outside the
    pose bins are left out and logged)."""
    renderers: dict[str, Any] = {}
    for name in sorted(classes):
        cfg = classes[name]
        if cfg["source"] == "procedural":
            renderers[name] = _procedural_renderer(cfg["gesture"], supersample, device)
        else:
            views = _FolderViews(Path(cfg["path"]).expanduser(), space, probs, size, float(radii[name]))
            if views.outside["total"]:
                log.warning("target/%s: class %s: %d of %d views lie outside pose_space and are left out (%s)", split,
                            name, views.outside["total"], views.n_views,
                            {k: v for k, v in views.outside.items() if k != "total"})
            renderers[name] = views
    return renderers


def _write_images(out_dir: Path, names: list[str], labels: torch.Tensor, renderers: Mapping[str, Any], poses: torch.Tensor,
                  shifts: torch.Tensor, backgrounds: torch.Tensor, intr: Intrinsics, gen: torch.Generator, desc: str,
                  progress: bool) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Render (or draw) image ``i`` of class ``names[labels[i]]`` shifted by ``shifts[i]`` over ``backgrounds[i]``
    into ``out_dir/NNNNN.png``; returns the COCO ``images`` and ``annotations`` and the count per class."""
    size = int(intr.w)
    images, annotations = [], []
    counts = {name: 0 for name in names}
    for i in tqdm(range(len(labels)), desc=desc, unit="img", disable=not progress, mininterval=2.0):
        name = names[int(labels[i])]
        du, dv = int(shifts[i, 0]), int(shifts[i, 1])
        source = renderers[name]
        if isinstance(source, _FolderViews):
            rgba = _shift_image(source.draw(gen), du, dv)
        else:
            rgba = source(poses[i], intr.shifted(du, dv))
        box = boxes_from_alpha(rgba[None, ..., 3], BOX_OPACITY)[0]
        if box[2] <= 0 or box[3] <= 0:
            raise InputError(None, f"classes.{name}", f"target image {i}: the object is not visible at the sampled pose")
        file_name = f"{i:05d}.png"
        write_png(out_dir / file_name, composite(rgba, backgrounds[i]).numpy())
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": int(labels[i]) + 1,
                            "bbox": [float(v) for v in box], "area": float((rgba[..., 3] > BOX_OPACITY).sum()),
                            "iscrowd": 0})
        counts[name] += 1
    return images, annotations, counts


def render_target(
    classes: Mapping[str, Mapping[str, Any]],
    space: PoseSpace,
    probs: Mapping[str, torch.Tensor],
    target_cfg: Mapping[str, Any],
    split: str,
    seed: int,
    images_dir: str | Path,
    annotations_path: str | Path,
    distribution_path: str | Path,
    radii: Mapping[str, float],
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, int]:
    """Render the ``split`` (``val`` or ``test``) of the target domain (procedural classes are ray-traced on
    ``device``; poses, shifts and backgrounds are drawn on the CPU).

    ``radii`` maps each class to its mean training-camera distance (``intrinsics.json``'s ``radius.mean``): the
    world units of one unit of zoom. Writes ``images_dir/NNNNN.png`` (RGB), the COCO ``annotations_path`` and
    ``distribution_path`` (the target pose distribution, read by the oracle baseline; for folder classes also how
    many of their views fell outside the pose bins and were left out). Returns the number of images per class.
    """
    names = sorted(classes)
    n = int(target_cfg["images"][split])
    size = int(target_cfg["image_size"])
    supersample = int(target_cfg["supersample"])
    camera = DetectionCamera.from_target_config(target_cfg)
    intr = camera.intrinsics
    gen = torch.Generator().manual_seed(class_seed(seed, "target", split))
    labels = torch.arange(n) % len(names)
    labels = labels[torch.randperm(n, generator=gen)]
    missing = [name for name in names if name not in radii]
    if missing:
        raise InputError(None, "radii", f"no training-camera distance for classes {missing}")
    scale = torch.tensor([float(radii[names[int(k)]]) for k in labels], dtype=torch.float64)
    poses = space.sample(probs, n, gen).poses(scale)
    shifts = draw_shifts(n, camera.max_shift, gen)
    backgrounds = random_backgrounds(n, size, gen)

    renderers = _class_renderers(classes, space, probs, size, supersample, device, radii, split)
    with atomic_dir(images_dir) as tmp:
        images, annotations, counts = _write_images(tmp, names, labels, renderers, poses, shifts, backgrounds, intr,
                                                    gen, f"target/{split}", progress)
    coco = {
        "info": {"description": f"instsim target domain, split {split}", "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(names),
    }
    write_json(annotations_path, coco)
    distribution = {
        "pose_space": space.to_dict(),
        "probabilities": {f: [float(p) for p in probs[f]] for f in space.FACTORS},
        "classes": names,
        "note": "target pose distribution (independent per factor, shared by all classes); zoom is relative to "
                "each class's mean training-camera distance (class_radius)",
        "class_radius": {name: float(radii[name]) for name in names},
    }
    outside = {n: {**r.outside, "views": r.n_views} for n, r in renderers.items()
               if isinstance(r, _FolderViews) and r.outside["total"]}
    if outside:  # folder views outside pose_space were left out: the target holds only the views inside the bins
        distribution["folder_views_outside_pose_space"] = outside
    write_json(distribution_path, distribution)
    log.info("target/%s: %d images %s", split, n, counts)
    return counts
