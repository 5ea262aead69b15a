"""Detector files: the trained model (:func:`save_detector` / :func:`load_detector`) and the resumable training
checkpoint, both ``torch.save`` dicts of format :data:`CHECKPOINT_FORMAT` written atomically.

A training checkpoint holds ``step``, ``total_steps``, ``config``, ``model``, ``optimizer``, ``rng`` (the global
torch RNG state) and a fingerprint of the training data; resuming with another config or other data is refused
(:func:`check_resume`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..io import load_torch, save_torch
from .config import DetectorConfig
from .model import CenterNet

__all__ = ["CHECKPOINT_FORMAT", "check_resume", "data_fingerprint", "load_detector", "read_checkpoint", "save_detector"]

CHECKPOINT_FORMAT = "instsim-detector-v1"


def data_fingerprint(images: torch.Tensor, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> str:
    """sha1 of the training data (images, boxes, labels), to refuse resuming on other data."""
    h = hashlib.sha1()
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(np.ascontiguousarray(torch.as_tensor(images).detach().cpu().numpy()).tobytes())
    for b, lb in zip(boxes, labels):
        h.update(np.ascontiguousarray(torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4).numpy()).tobytes())
        h.update(np.ascontiguousarray(torch.as_tensor(lb, dtype=torch.long).reshape(-1).numpy()).tobytes())
    return h.hexdigest()


def read_checkpoint(path: Path) -> dict:
    """A detector file or training checkpoint (format, ``config`` and ``model`` checked)."""
    ck = load_torch(path, CHECKPOINT_FORMAT, "an instsim detector checkpoint")
    for key in ("config", "model"):
        if key not in ck:
            raise InputError(path, key, "missing from the detector checkpoint")
    return ck


def save_detector(model: CenterNet, path: str | Path) -> None:
    """Write the model's config and weights (atomically); read back with :func:`load_detector`."""
    save_torch({"format": CHECKPOINT_FORMAT, "config": model.cfg.to_dict(), "model": model.state_dict(),
                  "complete": True}, Path(path))


def load_detector(path: str | Path) -> CenterNet:
    """A detector from :func:`save_detector` output or a training checkpoint (config + weights)."""
    path = Path(path)
    ck = read_checkpoint(path)
    cfg = DetectorConfig.from_dict(ck["config"], source=path)
    model = CenterNet(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise InputError(path, "model", f"weights do not fit the config: {e}") from None
    return model


def check_resume(ck: dict, path: Path, cfg: DetectorConfig, fingerprint: str | None) -> None:
    """Refuse a training checkpoint made with another config (naming each differing key) or other data."""
    saved, now = ck["config"], cfg.to_dict()
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise ConfigError(path, f"config.{key}", f"checkpoint was made with {saved.get(key)!r}, the config says "
                              f"{now.get(key)!r}; delete the checkpoint or train with resume=False")
    if ck.get("data") != fingerprint:
        raise InputError(path, "data", "checkpoint was trained on other images/boxes/labels; delete it or train with resume=False")
