"""The target domain's folder-class views (instsim.stages.target): zoom relative to the class's training-camera
distance, and views outside the pose bins counted and left out, never clamped into the end bins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instsim.poses import PoseSpace
from instsim.errors import InputError
from instsim.stages.intrinsics import camera_radius, extract_intrinsics
from instsim.stages.target import _FolderViews

TINY = Path(__file__).parent / "data" / "blendernerf_tiny"  # 8 test views at distance 3.5, elevations 17.6-42.4 deg


def _space(el=(-30.0, 60.0), zoom=(0.8666666666666667, 1.4666666666666668)) -> PoseSpace:
    return PoseSpace.from_config({"azimuth": {"bins": 8, "low": 0.0, "high": 360.0},
                                  "elevation": {"bins": 3, "low": el[0], "high": el[1]},
                                  "zoom": {"bins": 3, "low": zoom[0], "high": zoom[1]}})


def test_folder_views_use_zoom_relative_to_the_training_cameras_and_count_views_outside_the_bins():
    radius = camera_radius(extract_intrinsics(TINY / "transforms_train.json"))
    assert radius == pytest.approx(3.5, abs=1e-5)
    space = _space()
    probs = space.check_probs({"azimuth": [0.125] * 8, "elevation": [0.2, 0.3, 0.5], "zoom": [0.6, 0.3, 0.1]})
    views = _FolderViews(TINY, space, probs, 16, radius)
    assert views.outside == {"azimuth": 0, "elevation": 0, "zoom": 0, "total": 0} and views.n_views == 8
    # every view is at the training distance, zoom 1.0: the first zoom bin [0.867, 1.067)
    assert torch.all(views.weight > 0)
    # the same cameras of a class at another scale (training cameras twice as far): zoom 0.5, outside every bin
    with pytest.raises(InputError, match="outside the bins.*'zoom': 8"):
        _FolderViews(TINY, space, probs, 16, 2 * radius)
    # elevations 17.6 deg lie below [20, 60): counted and weightless, not put into the lowest bin
    high = _space(el=(20.0, 60.0))
    views = _FolderViews(TINY, high, high.check_probs({"azimuth": [0.125] * 8, "elevation": [0.2, 0.3, 0.5],
                                                       "zoom": [0.6, 0.3, 0.1]}), 16, radius)
    assert views.outside["elevation"] == 2 and views.outside["total"] == 2
    assert int((views.weight == 0).sum()) == 2


def test_camera_radius_names_the_field():
    assert camera_radius({"radius": {"mean": 2.5}}) == 2.5
    for bad in ({}, {"radius": {"mean": 0}}, {"radius": {"mean": "far"}}):
        with pytest.raises(InputError, match="radius.mean"):
            camera_radius(bad, "x/intrinsics.json")
