import json
import math

import pytest
import torch

from instsim.cameras import (
    Intrinsics,
    get_rays,
    look_at,
    pose_from_spherical,
    project,
    rigidity_error,
    sample_sphere_poses,
    spherical_from_pose,
)
from instsim.errors import InputError
from instsim.poses import PoseSpace

from conftest import BLENDERNERF_TINY


def _intr():
    return Intrinsics(w=40, h=30, fl_x=50.0, fl_y=45.0, cx=19.0, cy=16.5)


def test_pixel_ray_passes_through_projected_point():
    gen = torch.Generator().manual_seed(0)
    intr = _intr()
    c2w = pose_from_spherical(torch.tensor(0.7), torch.tensor(0.3), torch.tensor(4.0))
    points = (torch.rand(50, 3, generator=gen) - 0.5) * 2.0
    uv, depth = project(points, c2w, intr)
    assert (depth > 0).all()
    o, d = get_rays(c2w, intr, uv)
    # the point lies on the ray: o + t d with t = |p - o|, and d is unit length
    t = (points - o).norm(dim=-1, keepdim=True)
    assert torch.allclose(o + t * d, points, atol=1e-4)
    assert torch.allclose(d.norm(dim=-1), torch.ones(50), atol=1e-6)


def test_principal_ray_of_look_at_hits_target():
    target = torch.tensor([0.3, -0.2, 0.5])
    for az, el in [(0.0, 0.0), (1.0, 0.5), (-2.0, -0.7), (3.0, 1.2)]:
        c2w = pose_from_spherical(torch.tensor(az), torch.tensor(el), torch.tensor(3.0), target)
        intr = _intr()
        o, d = get_rays(c2w, intr, torch.tensor([[intr.cx, intr.cy]]))
        t = (target - o[0]).norm()
        assert torch.allclose(o[0] + t * d[0], target, atol=1e-5)
        uv, depth = project(target[None], c2w, intr)
        assert torch.allclose(uv[0], torch.tensor([intr.cx, intr.cy]), atol=1e-4)
        assert depth[0] == pytest.approx(3.0, abs=1e-5)


def test_camera_convention_axes():
    """Camera at +x looking at the origin: image right is world +y, image up is world +z (z-up world)."""
    c2w = pose_from_spherical(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(5.0))
    assert torch.allclose(c2w[:3, 3], torch.tensor([5.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(c2w[:3, 2], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # camera looks down -z
    intr = Intrinsics(64, 64, 60.0, 60.0, 32.0, 32.0)
    uv_right, _ = project(torch.tensor([[0.0, 1.0, 0.0]]), c2w, intr)
    assert uv_right[0, 0] > 32  # +y appears to the right
    uv_up, _ = project(torch.tensor([[0.0, 0.0, 1.0]]), c2w, intr)
    assert uv_up[0, 1] < 32  # +z appears above the centre (v grows downwards)


def test_blendernerf_frame_round_trips():
    meta = json.loads((BLENDERNERF_TINY / "transforms_train.json").read_text())
    for frame in meta["frames"][:10]:
        c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        assert rigidity_error(c2w) < 1e-5
        az, el, r = spherical_from_pose(c2w)
        assert float(r) == pytest.approx(3.5, abs=1e-4)
        again = pose_from_spherical(az, el, r)
        # BlenderNeRF's camera-on-sphere cameras are look-at cameras with world z up: same matrix
        assert torch.allclose(again, c2w, atol=1e-5)


def test_blendernerf_intrinsics_prefer_focal_length():
    meta = json.loads((BLENDERNERF_TINY / "transforms_train.json").read_text())
    intr = Intrinsics.from_transforms(meta)
    assert (intr.w, intr.h) == (64, 64) and isinstance(intr.w, int)
    assert intr.fl_y == pytest.approx(88.8889, abs=1e-3)  # not from the add-on's wrong camera_angle_y
    assert intr.fov_x == pytest.approx(meta["camera_angle_x"], abs=1e-6)


def test_intrinsics_from_angles():
    intr = Intrinsics.from_transforms({"w": 100, "h": 50, "camera_angle_x": math.radians(60)})
    assert intr.fl_x == pytest.approx(50 / math.tan(math.radians(30)))
    assert intr.fl_y == intr.fl_x and (intr.cx, intr.cy) == (50, 25)
    intr2 = Intrinsics.from_transforms({"w": 100, "h": 50, "camera_angle_x": 1.0, "camera_angle_y": 0.4})
    assert intr2.fl_y == pytest.approx(25 / math.tan(0.2))


@pytest.mark.parametrize(
    "meta, field",
    [
        ({"h": 10, "fl_x": 5}, "w"),
        ({"w": 10.5, "h": 10, "fl_x": 5}, "w"),
        ({"w": 10, "h": 10}, "fl_x"),
        ({"w": 10, "h": 10, "fl_x": float("nan")}, "fl_x"),
        ({"w": 10, "h": 10, "camera_angle_x": 4.0}, "camera_angle_x"),
        ({"w": 10, "h": 10, "fl_x": -3}, "fl_x"),
    ],
)
def test_bad_intrinsics_name_the_field(meta, field):
    with pytest.raises(InputError) as err:
        Intrinsics.from_transforms(meta, file="x.json")
    assert err.value.field == field and "x.json" in str(err.value)


def test_batched_rays_and_gradient_to_pose():
    intr = Intrinsics.from_fov(8, 6, 0.8)
    az = torch.tensor([0.1, 1.3], requires_grad=True)
    c2w = pose_from_spherical(az, torch.tensor([0.2, -0.3]), torch.tensor([3.0, 4.0]))
    o, d = get_rays(c2w, intr)
    assert o.shape == (2, 6, 8, 3) and d.shape == (2, 6, 8, 3)
    (o.sum() + d[..., 0].sum()).backward()
    assert az.grad is not None and torch.isfinite(az.grad).all() and az.grad.abs().sum() > 0


def test_look_at_straight_down_is_defined():
    c2w = look_at(torch.tensor([0.0, 0.0, 3.0]))
    assert torch.isfinite(c2w).all() and rigidity_error(c2w) < 1e-5
    assert torch.allclose(c2w[:3, 2], torch.tensor([0.0, 0.0, 1.0]))


def test_sphere_poses_are_look_at_and_on_sphere():
    poses = sample_sphere_poses(200, 2.5, torch.Generator().manual_seed(1), upper_hemisphere=True)
    assert torch.allclose(poses[:, :3, 3].norm(dim=-1), torch.full((200,), 2.5), atol=1e-4)
    assert (poses[:, 2, 3] >= -1e-5).all()
    assert (rigidity_error(poses) < 1e-4).all()


def test_pose_space_sampling_follows_probabilities():
    space = PoseSpace.from_config(
        {"azimuth": {"bins": 4, "low": 0, "high": 360}, "elevation": {"bins": 2, "low": -30, "high": 60},
         "zoom": {"bins": 3, "low": 3, "high": 6}}
    )
    probs = space.check_probs({"azimuth": [0.7, 0.1, 0.1, 0.1], "elevation": [0, 1], "zoom": [0.2, 0.3, 0.5]})
    s = space.sample(probs, 20000, torch.Generator().manual_seed(0))
    freq = torch.bincount(s.azimuth_bin, minlength=4).double() / 20000
    assert torch.allclose(freq, probs["azimuth"], atol=0.02)
    assert (s.elevation_bin == 1).all() and (s.elevation_deg >= 15).all() and (s.elevation_deg < 60).all()
    assert (s.zoom >= 3).all() and (s.zoom < 6).all()
    poses = s.poses(0.5)  # zoom is relative: times the class's training-camera distance
    assert poses.shape == (20000, 4, 4)
    assert torch.allclose(poses[:, :3, 3].double().norm(dim=-1), 0.5 * s.zoom, rtol=1e-6)


@pytest.mark.parametrize(
    "probs, msg",
    [
        ({"azimuth": [1.0], "elevation": [1.0], "zoom": [1.0]}, "needs 2"),
        ({"azimuth": [0.5, 0.6], "elevation": [1.0], "zoom": [1.0]}, "sum to 1"),
        ({"azimuth": [1.5, -0.5], "elevation": [1.0], "zoom": [1.0]}, ">= 0"),
        ({"azimuth": [0.5, 0.5], "zoom": [1.0]}, "missing"),
    ],
)
def test_bad_probabilities_name_the_factor(probs, msg):
    space = PoseSpace.from_config(
        {"azimuth": {"bins": 2, "low": 0, "high": 360}, "elevation": {"bins": 1, "low": 0, "high": 30},
         "zoom": {"bins": 1, "low": 3, "high": 4}}
    )
    with pytest.raises(InputError, match=msg):
        space.check_probs(probs, source="cfg.yaml", field="target.distribution")


_SPACE = {"azimuth": {"bins": 2, "low": 0, "high": 360}, "elevation": {"bins": 1, "low": 0, "high": 30},
          "zoom": {"bins": 1, "low": 3, "high": 4}}


@pytest.mark.parametrize(
    "factor, change, field, msg",
    [
        ("azimuth", {"high": 0}, "pose_space.azimuth", "greater than low"),
        ("zoom", {"low": 0, "high": 2}, "pose_space.zoom.low", "camera distance must be positive"),
        ("elevation", {"high": 95}, "pose_space.elevation", r"\[-90, 90\]"),
        ("azimuth", {"bins": 0}, "pose_space.azimuth.bins", "integer in"),
        ("azimuth", {"bins": 2.5}, "pose_space.azimuth.bins", "integer in"),
        ("zoom", {"low": float("nan")}, "pose_space.zoom.low", "finite"),
    ],
)
def test_bad_pose_space_names_the_key(factor, change, field, msg):
    """PoseSpace checks itself (the workflow's check_config relies on it): the library refuses what the config does."""
    cfg = {f: dict(v) for f, v in _SPACE.items()}
    cfg[factor].update(change)
    with pytest.raises(InputError, match=msg) as err:
        PoseSpace.from_config(cfg, source="cfg.yaml")
    assert err.value.field == field and "cfg.yaml" in str(err.value)
    missing = {f: v for f, v in _SPACE.items() if f != factor}
    with pytest.raises(InputError, match="missing"):
        PoseSpace.from_config(missing)
