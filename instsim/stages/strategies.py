"""Training-data strategies and the detection stages built on them (``train_detector``, ``evaluate``).

A strategy is a pose distribution per class that the synthetic training set is drawn from:

* ``uniform``: every bin equally likely (Neural-Sim's starting point);
* ``oracle``: the target domain's true distribution (``target/val/distribution.json``), an upper bound;
* ``neuralsim``: the distribution learned by Neural-Sim (``neuralsim/distribution.json``).

All strategies share the same budget: images per class, detector settings and training steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..poses import PoseSpace
from ..detect import DetectorConfig, load_coco
from ..errors import InputError
from ..io import read_image, read_json
from ..nerf.checkpoint import expect_from_intrinsics, load_checkpoint
from .intrinsics import camera_radius

__all__ = ["STRATEGIES", "strategy_probs", "load_class_nerfs", "load_coco_images", "detector_config"]

log = logging.getLogger(__name__)

STRATEGIES = ("uniform", "oracle", "neuralsim")


def strategy_probs(
    strategy: str, classes: Sequence[str], space: PoseSpace, distribution_path: str | Path | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """The per-class pose distribution ``{cls: {factor: (bins,)}}`` a strategy trains from.

    ``oracle`` reads the target's ``distribution.json`` (one distribution for all classes, key
    ``probabilities``); ``neuralsim`` reads Neural-Sim's (key ``classes``: one per class).
    """
    if strategy == "uniform":
        return {c: space.uniform() for c in classes}
    if distribution_path is None:
        raise ValueError(f"strategy '{strategy}' needs a distribution file")
    data = read_json(distribution_path, "distribution file")
    if not isinstance(data, dict):
        raise InputError(distribution_path, None, "must be a JSON object")
    if strategy == "oracle":
        if "probabilities" not in data:
            raise InputError(distribution_path, "probabilities", "missing (target pose distribution)")
        probs = space.check_probs(data["probabilities"], source=str(distribution_path), field="probabilities")
        return {c: probs for c in classes}
    if strategy == "neuralsim":
        per_class = data.get("classes")
        if not isinstance(per_class, dict):
            raise InputError(distribution_path, "classes", "missing (learned distribution per class)")
        out = {}
        for c in classes:
            if c not in per_class:
                raise InputError(distribution_path, f"classes.{c}", "no learned distribution for this class")
            out[c] = space.check_probs(per_class[c], source=str(distribution_path), field=f"classes.{c}")
        return out
    raise ValueError(f"unknown strategy '{strategy}' (choose one of {', '.join(STRATEGIES)})")


def load_class_nerfs(
    checkpoints: Mapping[str, str | Path], intrinsics: Mapping[str, str | Path], device: torch.device | str
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor], dict[str, float]]:
    """Load every class's NeRF (checked against its ``intrinsics.json``), its look-at centre ``(3,)`` and its mean
    training-camera distance (the world units of one unit of zoom): ``(models, centres, radii)``."""
    models, centres, radii = {}, {}, {}
    for cls, ckpt in checkpoints.items():
        info = read_json(intrinsics[cls], "intrinsics file")
        models[cls], _ = load_checkpoint(ckpt, expect=expect_from_intrinsics(info), device=device)
        centres[cls] = torch.tensor(info["centre"], dtype=torch.float64)
        radii[cls] = camera_radius(info, intrinsics[cls])
    return models, centres, radii


def load_coco_images(
    annotations_path: str | Path, images_dir: str | Path
) -> tuple[dict, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A COCO set on disk as tensors: ``(coco, images (N, 3, H, W) float, boxes [(n_i, 4)], labels [(n_i,)])``.

    Labels are 0-based (``category_id - 1``); images follow the order of ``coco["images"]``. The json is
    validated (an empty or malformed file raises :class:`InputError` naming it and the field).
    """
    coco = load_coco(annotations_path)
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    images, boxes, labels = [], [], []
    for i, img in enumerate(coco["images"]):
        image_path = Path(images_dir) / img["file_name"]
        try:
            arr = read_image(image_path, field=f"images[{i}].file_name")[..., :3]
        except InputError as e:  # name the json too: it is where the file name came from
            raise InputError(annotations_path, f"images[{i}].file_name", f"image {image_path}: {e.message}") from None
        images.append(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))
        anns = by_image[img["id"]]
        boxes.append(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor([a["category_id"] - 1 for a in anns], dtype=torch.long))
    return coco, torch.stack(images), boxes, labels


def detector_config(settings: Mapping[str, Any], image_size: int, num_classes: int, seed: int) -> DetectorConfig:
    """The :class:`~instsim.detect.DetectorConfig` of the config's ``detector.settings`` for this run."""
    d = dict(settings)
    d.update(image_size=int(image_size), num_classes=int(num_classes), seed=int(seed))
    return DetectorConfig.from_dict(d, source="config")
