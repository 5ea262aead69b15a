"""Resume checkpoints of the Neural-Sim loop: what identifies a run (so a checkpoint of another config, val
set or mode is refused, naming what differs) and reading one back."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..poses import PoseSpace
from ..io import load_torch
from .objective import ValSet

__all__ = ["CHECKPOINT_FORMAT", "describe_difference", "fingerprint", "read_checkpoint"]

CHECKPOINT_FORMAT = "instsim-neuralsim-v1"


def fingerprint(val: ValSet, classes: Sequence[str], space: PoseSpace, target_probs: Mapping[str, torch.Tensor] | None) -> str:
    """SHA-1 of the classes, pose space, val set (images, boxes, labels) and target distribution."""
    h = hashlib.sha1()
    h.update(repr((list(classes), space.to_dict())).encode())
    x = torch.as_tensor(val.images)
    h.update(str((tuple(x.shape), str(x.dtype))).encode())
    h.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
    for b, lb in zip(val.boxes, val.labels):
        h.update(np.ascontiguousarray(torch.as_tensor(b, dtype=torch.float64).reshape(-1).numpy()).tobytes())
        h.update(np.ascontiguousarray(torch.as_tensor(lb, dtype=torch.long).reshape(-1).numpy()).tobytes())
    if target_probs is not None:
        h.update(repr({f: [float(p) for p in target_probs[f]] for f in sorted(target_probs)}).encode())
    return h.hexdigest()


def describe_difference(saved: Any, want: Any) -> str:
    """``saved`` vs ``want`` for a message: for two dicts only the keys that differ (``iterations: 5 vs 3``),
    since a whole config dict hides the one value the user has to look for."""
    if isinstance(saved, Mapping) and isinstance(want, Mapping):
        keys = sorted(set(saved) | set(want), key=str)
        diffs = [f"{k}: {saved.get(k)!r} vs {want.get(k)!r}" for k in keys if saved.get(k) != want.get(k)]
        return "checkpoint vs this run: " + "; ".join(diffs)
    return f"checkpoint {saved!r} vs this run {want!r}"


def read_checkpoint(path: Path) -> dict:
    """A Neural-Sim resume checkpoint (format checked; a truncated or foreign file is an InputError)."""
    return load_torch(path, CHECKPOINT_FORMAT, "a Neural-Sim resume checkpoint", hint="; delete it to start over")
