"""Instant-NeRF (hash-grid NeRF) in pure PyTorch: one model per object class, pose-differentiable rendering.

Modules: :mod:`.config` (settings), :mod:`.normalization` (world -> NeRF cube), :mod:`.encoding` (hash grid,
spherical harmonics), :mod:`.network` (the model), :mod:`.occupancy` (empty-space grid), :mod:`.rendering`
(march, composite, render), :mod:`.checkpoint`, :mod:`.train`, :mod:`.metrics`, :mod:`.validate`.

The names most callers need are re-exported here.
"""

from .checkpoint import FORMAT_VERSION, expect_from_intrinsics, load_checkpoint, save_checkpoint
from .config import NerfConfig, resolve_max_res
from .network import InstantNerf
from .normalization import SceneNormalization
from .rendering import render
from .train import train_nerf
from .validate import convention_check, unseen_poses, validate_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "InstantNerf",
    "NerfConfig",
    "SceneNormalization",
    "convention_check",
    "expect_from_intrinsics",
    "load_checkpoint",
    "render",
    "resolve_max_res",
    "save_checkpoint",
    "train_nerf",
    "unseen_poses",
    "validate_checkpoint",
]
