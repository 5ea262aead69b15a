"""Fallbacks are said and recorded: a stage that takes a second-best path logs it, and where the result changes, the
stage's output JSON records it. (The NeRF renderer's ``chunk`` is tested in tests/test_nerf.py.)"""

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from instsim import backend
from instsim.cameras import Intrinsics, pose_from_spherical
from instsim.poses import PoseSpace
from instsim.errors import InputError, InstsimError
from instsim.nerf.config import NerfConfig
from instsim.nerf.network import InstantNerf
from instsim.nerf.normalization import SceneNormalization
from instsim.nerf.validate import validate_checkpoint
from instsim.stages import dataset as dataset_stage
from instsim.stages.dataset import import_folder
from instsim.stages.intrinsics import extract_intrinsics
from instsim.stages.target import render_target
from instsim.transforms import Frame, Transforms, Views

from conftest import BLENDERNERF_TINY


def _ring_transforms(poses: torch.Tensor) -> Transforms:
    """Transforms of ``poses`` ``(N, 4, 4)``, 32 px at a 20 degree field of view (no images: intrinsics only)."""
    intr = Intrinsics.from_fov(32, 32, math.radians(20))
    return Transforms(Path("ring.json"), intr, [Frame(f"{i}", Path(f"{i}.png"), p.numpy()) for i, p in enumerate(poses)])


def test_intrinsics_record_a_cropped_view_fallback(caplog):
    """When one camera does not see what the others see, the scene bound comes from the points most cameras see:
    the bound grows, a warning says so and ``scene.view_fraction`` records it; with every camera on the object
    the key is absent (a run whose cameras all see the object writes the same intrinsics.json as before)."""
    az = torch.linspace(0, 2 * math.pi, 9)[:-1]
    ring = pose_from_spherical(az, torch.zeros(8), torch.full((8,), 3.0)).double()
    with caplog.at_level(logging.WARNING, logger="instsim"):
        whole = extract_intrinsics(_ring_transforms(ring))
    assert "view_fraction" not in whole["scene"] and not caplog.records
    slid = ring.clone()
    slid[0, :3, 3] += 2.0 * slid[0, :3, 0]  # one camera slid sideways by 2 units: the centre leaves its view
    with caplog.at_level(logging.WARNING, logger="instsim"):
        cropped = extract_intrinsics(_ring_transforms(slid))
    assert cropped["scene"]["view_fraction"] == 0.5
    assert cropped["scene"]["bound"] > whole["scene"]["bound"]
    assert any("ring.json" in r.getMessage() and "50%" in r.getMessage() for r in caplog.records)


def test_folder_import_says_when_it_copies_instead_of_linking(tmp_path, monkeypatch, caplog):
    def no_symlinks(src, dst):
        raise OSError("symbolic links not supported")

    monkeypatch.setattr(dataset_stage.os, "symlink", no_symlinks)
    with caplog.at_level(logging.INFO, logger="instsim"):
        counts = import_folder(BLENDERNERF_TINY, tmp_path / "data", val_fraction=0.1)
    train = sorted((tmp_path / "data" / "train").iterdir())
    assert len(train) == counts["train"] and not any(p.is_symlink() for p in train)
    assert any("copied" in r.getMessage() and "train" in r.getMessage() for r in caplog.records)


def _space(zoom_low: float, zoom_high: float, el_low: float = -90.0) -> PoseSpace:
    return PoseSpace.from_config({"azimuth": {"bins": 4, "low": 0.0, "high": 360.0},
                                  "elevation": {"bins": 2, "low": el_low, "high": 90.0},
                                  "zoom": {"bins": 2, "low": zoom_low, "high": zoom_high}})


def _folder_target(tmp_path: Path, space: PoseSpace, radius: float = 3.5) -> dict:
    target_cfg = {"image_size": 32, "fov_deg": 40.0, "images": {"val": 2}, "max_shift": 0.0, "supersample": 1}
    render_target({"obj": {"source": "folder", "path": str(BLENDERNERF_TINY)}}, space, space.uniform(), target_cfg,
                  "val", 0, tmp_path / "images", tmp_path / "annotations.json", tmp_path / "distribution.json",
                  {"obj": radius}, progress=False)
    return json.loads((tmp_path / "distribution.json").read_text())


def test_folder_target_records_views_outside_the_pose_space(tmp_path, caplog):
    """The fixture's cameras sit at their training distance (zoom 1.0). A pose space that holds them records nothing;
    views outside it (here: elevations below 20 degrees) are left out, never weighted by an edge bin, and the log and
    distribution.json say how many; a pose space that holds none of them is an error naming the counts."""
    inside = _folder_target(tmp_path / "inside", _space(0.8, 1.2))
    assert "folder_views_outside_pose_space" not in inside and inside["class_radius"] == {"obj": 3.5}
    n_views = len(json.loads((BLENDERNERF_TINY / "transforms_test.json").read_text())["frames"])
    with caplog.at_level(logging.WARNING, logger="instsim"):
        some = _folder_target(tmp_path / "some", _space(0.8, 1.2, el_low=20.0))
    assert some["folder_views_outside_pose_space"] == {"obj": {"azimuth": 0, "elevation": 2, "zoom": 0, "total": 2,
                                                               "views": n_views}}
    assert any("outside pose_space" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match="'zoom': 8"):
        _folder_target(tmp_path / "none", _space(1.1, 1.5))


def test_auto_backend_fallback_on_a_gpu_is_remembered(monkeypatch, caplog):
    """``backend: auto`` on a GPU whose kernels do not load takes the PyTorch path with a warning, and the reason is
    kept for the stages' JSON. (Device index 7: a cache entry of its own, on a CPU-only machine too.)"""
    def no_kernels(index):
        raise InstsimError("nvcc not found")

    monkeypatch.setattr(backend, "load_kernels", no_kernels)
    gpu = torch.device("cuda", 7)
    assert backend.fallback_reason(gpu) is None
    with caplog.at_level(logging.WARNING, logger="instsim"):
        assert backend.uses_cuda("auto", gpu) is False
    assert backend.fallback_reason(gpu) == "nvcc not found"
    assert any("nvcc not found" in r.getMessage() for r in caplog.records)
    assert backend.fallback_reason("cpu") is None


def test_validation_records_a_backend_fallback(monkeypatch):
    """validation.json says when its numbers come from the PyTorch path on a GPU meant for the kernels."""
    cfg = NerfConfig.cpu(n_levels=2, log2_table=8, base_res=4, max_res=16, hidden_dim=8, grid_res=8, march_steps=64)
    model = InstantNerf(cfg, SceneNormalization.from_bound([0.0, 0.0, 0.0], 1.0)).eval()
    intr = Intrinsics.from_fov(8, 8, 0.8)
    pose = pose_from_spherical(torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([3.0])).float()
    views = Views(torch.rand(1, 8, 8, 4), pose, intr, ["v0"])
    assert "backend_fallback" not in validate_checkpoint(model, views)
    monkeypatch.setattr(backend, "fallback_reason", lambda device: "nvcc not found")
    assert validate_checkpoint(model, views)["backend_fallback"] == "nvcc not found"
    # a model configured for the PyTorch path did not fall back: nothing to record
    torch_path = InstantNerf(cfg.replace(backend="torch"), SceneNormalization.from_bound([0.0, 0.0, 0.0], 1.0)).eval()
    assert "backend_fallback" not in validate_checkpoint(torch_path, views)
