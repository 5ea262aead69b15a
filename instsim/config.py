"""Checks on the workflow config that its JSON schema cannot express, and typed views of its sections.

The schema (``workflow/schemas/config.schema.yaml``) checks types and ranges; this module checks what
depends on several keys (a probability per bin) or on the file system (a folder class's path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .cameras import PoseSpace
from .errors import ConfigError

__all__ = ["check_config", "pose_space", "target_distribution", "resolve_device"]


def pose_space(config: Mapping[str, Any]) -> PoseSpace:
    """The config's binned pose space."""
    return PoseSpace.from_config(config["pose_space"])


def target_distribution(config: Mapping[str, Any], source: str = "config") -> dict[str, torch.Tensor]:
    """The target domain's probabilities per factor ``{factor: (bins,)}``, checked against ``pose_space``."""
    return pose_space(config).check_probs(config["target"]["distribution"], source=source, field="target.distribution")


def check_config(config: Mapping[str, Any], source: str = "config") -> None:
    """Raise :class:`ConfigError` naming the key for every cross-field problem (the first one found)."""
    space = config["pose_space"]
    for name, f in space.items():
        if not f["high"] > f["low"]:
            raise ConfigError(source, f"pose_space.{name}", f"high ({f['high']}) must be greater than low ({f['low']})")
    if not space["zoom"]["low"] > 0:
        raise ConfigError(source, "pose_space.zoom.low", "the camera distance must be positive")
    el = space["elevation"]
    if el["low"] < -90 or el["high"] > 90:
        raise ConfigError(source, "pose_space.elevation", "elevation must lie within [-90, 90] degrees")
    target_distribution(config, source)
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
