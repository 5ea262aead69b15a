"""Checks on the workflow config that its JSON schema cannot express, and typed views of its sections.

The schema (``workflow/schemas/config.schema.yaml``) checks types and ranges; this module checks what
depends on several keys (a probability per bin) or on the file system (a folder class's path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..cameras import PoseSpace
from ..errors import ConfigError
from ..nerf.config import NerfConfig
from .strategies import detector_config

__all__ = ["check_config", "pose_space", "target_distribution", "resolve_device", "gpu_jobs", "nerf_config", "NERF_WORKFLOW_KEYS"]

#: keys of the config's ``nerf`` section that belong to the workflow; all others are NerfConfig fields
NERF_WORKFLOW_KEYS = ("preset", "min_psnr", "min_mask_iou", "validation_background")


def pose_space(config: Mapping[str, Any], source: str = "config") -> PoseSpace:
    """The config's binned pose space (checked: :meth:`~instsim.cameras.PoseSpace.from_config`)."""
    return PoseSpace.from_config(config["pose_space"], source=source)


def target_distribution(config: Mapping[str, Any], source: str = "config") -> dict[str, torch.Tensor]:
    """The target domain's probabilities per factor ``{factor: (bins,)}``, checked against ``pose_space``."""
    return pose_space(config, source).check_probs(config["target"]["distribution"], source=source, field="target.distribution")


def check_config(config: Mapping[str, Any], source: str = "config") -> None:
    """Raise :class:`ConfigError` naming the key for every cross-field problem (the first one found)."""
    target_distribution(config, source)  # checks pose_space too
    nerf = config.get("nerf")
    if nerf is not None:
        nerf_config(nerf["preset"], {k: v for k, v in nerf.items() if k not in NERF_WORKFLOW_KEYS}, source=source)
    if config.get("neuralsim") is not None:
        from ..neuralsim.loop import NeuralSimConfig

        NeuralSimConfig.from_dict(config["neuralsim"], source=source)
    det = config.get("detector")
    if det is not None:
        detector_config(det["settings"], config["target"]["image_size"], len(config["classes"]), config["seed"])
    for name, cls in config["classes"].items():
        if cls["source"] == "folder":
            path = Path(cls["path"]).expanduser()
            if not path.is_dir():
                raise ConfigError(source, f"classes.{name}.path", f"folder '{path}' does not exist")
            if not (path / "transforms_train.json").is_file():
                raise ConfigError(
                    source, f"classes.{name}.path", f"'{path}' has no transforms_train.json (BlenderNeRF / NeRF-synthetic)"
                )


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config", "device", "'cuda' was asked for but torch sees no GPU; use 'auto' or 'cpu'")
    return torch.device(device)


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
