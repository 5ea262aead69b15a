"""Checks on the workflow config that its JSON schema cannot express, and typed views of its sections.

The schema (``workflow/schemas/config.schema.yaml``) checks types and ranges; this module checks what
depends on several keys (a probability per bin) or on the file system (a folder class's path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..backend import resolve_device
from ..poses import PoseSpace
from ..errors import ConfigError
from ..nerf.config import NerfConfig
from ..neuralsim.config import NeuralSimConfig
from ..scene.blender import BLENDER_KEYS, BlenderCapture, bpy_python
from .strategies import detector_config

__all__ = ["check_config", "check_target", "pose_space", "target_distribution", "resolve_device", "gpu_jobs", "nerf_config", "NERF_WORKFLOW_KEYS"]

#: largest ``pose_space.zoom.high`` accepted: zoom is a multiple of each class's training-camera distance, and
#: beyond a few times that an object covers a handful of pixels; a larger value is most likely a camera distance
#: in world units from a config written before zoom became relative
MAX_RELATIVE_ZOOM = 4.0

#: keys of the config's ``nerf`` section that belong to the workflow; all others are NerfConfig fields
NERF_WORKFLOW_KEYS = ("preset", "min_psnr", "min_mask_iou", "validation_background")
#: keys of the ``target`` section that belong to one target source only
TARGET_KEYS_OF = {"rendered": ("images", "supersample", "distribution"),
                  "coco": ("val", "test", "resize", "distribution_file")}


def pose_space(config: Mapping[str, Any], source: str = "config") -> PoseSpace:
    """The config's binned pose space (checked: :meth:`~instsim.poses.PoseSpace.from_config`)."""
    return PoseSpace.from_config(config["pose_space"], source=source)


def target_distribution(config: Mapping[str, Any], source: str = "config") -> dict[str, torch.Tensor]:
    """The target domain's probabilities per factor ``{factor: (bins,)}``, checked against ``pose_space``."""
    return pose_space(config, source).check_probs(config["target"]["distribution"], source=source, field="target.distribution")


def check_config(config: Mapping[str, Any], source: str = "config") -> None:
    """Raise :class:`ConfigError` naming the key for every cross-field problem (the first one found)."""
    pose_space(config, source)  # the bins, checked
    check_target(config, source)
    zoom_high = config["pose_space"]["zoom"]["high"]
    if zoom_high > MAX_RELATIVE_ZOOM:
        raise ConfigError(source, "pose_space.zoom.high", f"{zoom_high} is more than {MAX_RELATIVE_ZOOM} times the training "
                          "cameras' distance: zoom is relative to each class's mean training-camera distance "
                          "(intrinsics.json radius.mean), not world units")
    nerf = config.get("nerf")
    if nerf is not None:
        nerf_config(nerf["preset"], {k: v for k, v in nerf.items() if k not in NERF_WORKFLOW_KEYS}, source=source)
    if config.get("neuralsim") is not None:
        NeuralSimConfig.from_dict(config["neuralsim"], source=source)
    det = config.get("detector")
    if det is not None:
        detector_config(det["settings"], config["target"]["image_size"], len(config["classes"]), config["seed"])
    for name, cls in config["classes"].items():
        if cls["source"] != "blender":
            extra = sorted(set(cls) & set(BLENDER_KEYS) - {"source"})
            if extra:
                raise ConfigError(source, f"classes.{name}.{extra[0]}", f"belongs to source blender, not {cls['source']}")
        if cls["source"] == "blender":
            cap = BlenderCapture.from_config(cls, name, source)
            if not Path(cap.blend).expanduser().is_file():
                raise ConfigError(source, f"classes.{name}.blend", f"file '{cap.blend}' does not exist")
            try:
                bpy_python(cap, f"classes.{name}")
            except ConfigError as e:
                raise ConfigError(source, e.field, e.message) from None
        if cls["source"] == "folder":
            path = Path(cls["path"]).expanduser()
            if not path.is_dir():
                raise ConfigError(source, f"classes.{name}.path", f"folder '{path}' does not exist")
            if not (path / "transforms_train.json").is_file():
                raise ConfigError(
                    source, f"classes.{name}.path", f"'{path}' has no transforms_train.json (BlenderNeRF / NeRF-synthetic)"
                )


def check_target(config: Mapping[str, Any], source: str = "config") -> None:
    """The ``target`` section: keys of the other source refused; a rendered target's distribution per bin; a COCO
    target's splits found, readable, matched to the classes by name, the test split held out (another file,
    no shared image), and the ``oracle`` strategy only with the target's pose distribution
    (``target.distribution_file``), which a set of photos does not come with."""
    from .coco_target import coco_source, match_categories, read_target_distribution, target_source

    target = config["target"]
    kind = target_source(config)
    for other, keys in TARGET_KEYS_OF.items():
        for key in keys:
            if other != kind and key in target:
                raise ConfigError(source, f"target.{key}", f"belongs to target.source {other}, not {kind} (a "
                                  "--configfile is merged over config.yaml: --replace-workflow-config replaces it)")
    if kind == "rendered":
        target_distribution(config, source)
        return
    from ..detect.coco import load_coco

    classes = list(config["classes"])
    splits, images = {}, {}
    for split in ("val", "test"):
        src = splits[split] = coco_source(target[split], f"target.{split}", source)
        try:
            coco = load_coco(src.annotations, file_names=True)
            match_categories(coco["categories"], classes, src.annotations)
        except ConfigError as e:
            raise ConfigError(source, f"target.{split}", f"{src.annotations}: {e.message}") from None
        images[split] = {(src.images / img["file_name"]).resolve() for img in coco["images"]}
    if splits["val"].annotations.resolve() == splits["test"].annotations.resolve():
        raise ConfigError(source, "target.test", f"is target.val's file {splits['val'].annotations}: the test split "
                          "must be held out from the val split that steers Neural-Sim")
    shared = sorted(images["val"] & images["test"])
    if shared:
        raise ConfigError(source, "target.test", f"shares {len(shared)} images with target.val (first: {shared[0]}): "
                          "the test split must be held out from the val split that steers Neural-Sim")
    if "distribution_file" in target:
        read_target_distribution(target["distribution_file"], pose_space(config), classes, source)
    elif "oracle" in config.get("strategies", ()):
        raise ConfigError(source, "strategies", "'oracle' trains on the target's true pose distribution, which a COCO "
                          "target does not come with: give it as target.distribution_file (a distribution.json of "
                          "the form render_target writes) or drop 'oracle' from strategies")


def gpu_jobs(device: str) -> int:
    """GPUs a GPU stage asks the scheduler for: 1 when the run uses CUDA. ``auto`` on a host without a GPU
    (e.g. a cluster's login node) asks for none; say ``device: cuda`` to get GPU nodes on a cluster."""
    if device == "cuda":
        return 1
    return int(device == "auto" and torch.cuda.is_available())


def nerf_config(
    preset: str, overrides: Mapping[str, Any], device: str | None = None, seed: int | None = None, source: str = "config"
) -> NerfConfig:
    """The :class:`~instsim.nerf.config.NerfConfig` of a preset (``cpu`` or ``paper``) with overrides."""
    extra = dict(overrides)
    if device is not None:
        extra["device"] = device
    if seed is not None:
        extra.setdefault("seed", seed)
    return NerfConfig.preset(preset, extra, source=source)
