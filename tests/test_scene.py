"""Procedural hands and their renderer (instsim.scene)."""

from __future__ import annotations

import math

import pytest
import torch

from instsim.cameras import Intrinsics, get_rays, pose_from_spherical, project, sample_sphere_poses
from instsim.errors import InputError
from instsim.scene import GESTURES, Scene, bounding_radius, make_hand, render_alpha_depth, render_scene
from instsim.scene.hand import scene_sdf
from instsim.scene import render as render_mod
from instsim.scene.render import intersect_capsules

INTR = Intrinsics.from_fov(64, 64, math.radians(40))


def poses_deg(az, el, r=4.0) -> torch.Tensor:
    """``(B, 4, 4)`` look-at poses from azimuth/elevation in degrees (scalars or lists)."""
    az, el = torch.as_tensor(az, dtype=torch.float64), torch.as_tensor(el, dtype=torch.float64)
    az, el = torch.broadcast_tensors(torch.atleast_1d(az), torch.atleast_1d(el))
    return pose_from_spherical(torch.deg2rad(az), torch.deg2rad(el), torch.full_like(az, r)).float()


@pytest.fixture(scope="module")
def hands() -> dict[str, Scene]:
    return {g: make_hand(g) for g in GESTURES}


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def object_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean absolute RGBA difference over the pixels either image covers."""
    union = (x[..., 3] > 0) | (y[..., 3] > 0)
    return float((x - y).abs()[union].mean())


def test_scene_fits_unit_sphere(hands):
    for g, scene in hands.items():
        k = len(scene)
        assert scene.a.shape == scene.b.shape == scene.albedo.shape == (k, 3), g
        assert scene.radius.shape == (k,) and scene.a.dtype == torch.float32
        assert 0.5 < bounding_radius(scene) < 1.0, g
        assert (scene.albedo >= 0).all() and (scene.albedo <= 1).all()
        assert scene_sdf(scene, torch.zeros(1, 3)).item() < 0.1  # centred on the hand


def test_renders_in_range_nonempty_and_not_cut(hands):
    # elevation extremes and a spread of azimuths at radius 4, fov 40 deg
    poses = torch.cat([poses_deg([0.0, 90.0, 200.0, 300.0], [0.0, 30.0, -40.0, 80.0]),
                       sample_sphere_poses(4, 4.0, torch.Generator().manual_seed(3))])
    for g, scene in hands.items():
        img = render_scene(scene, poses, INTR, supersample=2)
        assert img.shape == (8, 64, 64, 4) and img.dtype == torch.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
        alpha = img[..., 3]
        assert (alpha.flatten(1).sum(1) > 20).all(), g
        border = torch.cat([alpha[:, 0], alpha[:, -1], alpha[:, :, 0], alpha[:, :, -1]], dim=1)
        assert border.max() == 0.0, g
        assert (img[..., :3][alpha == 0] == 0).all()  # background-free
        # straight alpha: edge pixels keep the full colour of their covered part
        edge = (alpha > 0) & (alpha < 1)
        assert edge.any()
        assert img[..., :3][edge].amax(dim=-1).mean() > 0.2


def test_gestures_have_different_silhouettes(hands):
    for az, el in ((0.0, 10.0), (180.0, 10.0), (60.0, 30.0)):
        masks = {g: render_scene(s, poses_deg(az, el), INTR)[0, ..., 3] > 0.5 for g, s in hands.items()}
        for i, g1 in enumerate(GESTURES):
            for g2 in GESTURES[i + 1 :]:
                assert mask_iou(masks[g1], masks[g2]) < 0.9, (g1, g2, az, el)


def test_viewpoint_matters(hands):
    for g, scene in hands.items():
        img = render_scene(scene, poses_deg([0.0, 90.0, 180.0], 0.0), INTR)
        front, side, back = img
        assert object_diff(front, side) > 0.1, g
        assert object_diff(front, back) > 0.1, g
        assert object_diff(side, back) > 0.1, g
        # the back view is not the mirrored front view: colours differ where both are covered
        mirrored = back.flip(1)
        both = (front[..., 3] > 0.99) & (mirrored[..., 3] > 0.99)
        assert both.sum() > 20
        assert (front[..., :3] - mirrored[..., :3])[both].abs().mean() > 0.05, g


def test_palm_faces_azimuth_zero_and_thumb_is_on_the_right():
    """Hand convention: palm towards +x (azimuth 0), thumb towards +y (right of the image from azimuth 0)."""
    scene = make_hand("palm")
    c2w = poses_deg(0.0, 0.0)[0]
    thumb_tip = scene.b[scene.names.index("thumb.2")]
    pinky_tip = scene.b[scene.names.index("pinky.2")]
    uv, _ = project(torch.stack([thumb_tip, pinky_tip]), c2w, INTR)
    assert uv[0, 0] > INTR.cx > uv[1, 0]
    # the palm (lighter albedo) is what a camera at azimuth 0 sees; the back from 180 is darker
    img = render_scene(scene, poses_deg([0.0, 180.0], 0.0), INTR)
    lum = [float(im[..., :3][im[..., 3] > 0.99].mean()) for im in img]
    assert lum[0] > lum[1] + 0.05


def test_surface_point_projects_onto_covered_pixel(hands):
    poses = poses_deg([0.0, 120.0, 250.0], [20.0, -15.0, 50.0])
    for g, scene in hands.items():
        alpha, depth = render_alpha_depth(scene, poses, INTR, supersample=1)
        for i, c2w in enumerate(poses):
            centre = c2w[:3, 3]
            to_cam = centre - scene.a
            pts = scene.a + scene.radius[:, None] * to_cam / to_cam.norm(dim=-1, keepdim=True)
            uv, z = project(pts, c2w, INTR)
            assert (z > 0).all()
            px = uv.floor().long()
            assert alpha[i, px[:, 1], px[:, 0]].min() > 0, g
            # nothing the camera sees at that pixel is farther than the surface point (up to a pixel's slack)
            dist = (pts - centre).norm(dim=-1)
            assert (depth[i, px[:, 1], px[:, 0]] <= dist + 0.08).all(), g


def brute_force_hit(scene: Scene, o: torch.Tensor, d: torch.Tensor, t_max: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sphere tracing of the exact union SDF (float64): first-hit t (inf for misses) and the smallest SDF value
    seen along the ray by dense sampling (how close a miss grazes)."""
    s64 = Scene(scene.a.double(), scene.b.double(), scene.radius.double(), scene.albedo)
    o, d = o.double(), d.double()
    t = torch.zeros(o.shape[0], dtype=torch.float64)
    for _ in range(150):
        dist = scene_sdf(s64, o + t[:, None] * d)
        t = torch.where(dist > 1e-9, t + dist, t).clamp(max=t_max)
    hit = scene_sdf(s64, o + t[:, None] * d) < 1e-6
    ts = torch.linspace(0.5, 5.5, 1000, dtype=torch.float64)  # every ray below meets the scene's sphere in here
    dense = torch.cat([
        scene_sdf(s64, o[i : i + 64, None, :] + ts[None, :, None] * d[i : i + 64, None, :]).min(dim=1).values
        for i in range(0, o.shape[0], 64)
    ])
    return torch.where(hit, t, torch.full_like(t, math.inf)), dense


def test_ray_capsule_intersection_matches_sphere_tracing():
    gen = torch.Generator().manual_seed(0)
    scene = make_hand("yeah")
    n = 300
    # rays from random points on a sphere of radius 3 aimed at random points near the capsules
    o = torch.randn(n, 3, generator=gen)
    o = 3.0 * o / o.norm(dim=-1, keepdim=True)
    k = torch.randint(0, len(scene), (n,), generator=gen)
    h = torch.rand(n, 1, generator=gen)
    target = scene.a[k] + h * (scene.b[k] - scene.a[k]) + 0.08 * torch.randn(n, 3, generator=gen)
    d = target - o
    d = d / d.norm(dim=-1, keepdim=True)
    # plus rays straight down capsule axes (the cylinder test degenerates; the caps must catch them)
    axis = (scene.b - scene.a) / (scene.b - scene.a).norm(dim=-1, keepdim=True)
    o = torch.cat([o, scene.b + 2.5 * axis])
    d = torch.cat([d, -axis])
    t, idx = intersect_capsules(o, d, scene)
    t_ref, closest = brute_force_hit(scene, o, d)
    clear = closest.abs() > 1e-3  # skip rays grazing the surface (within 1e-3): hit or miss is ambiguous
    assert clear.sum() > 0.9 * o.shape[0]
    assert torch.equal(torch.isfinite(t)[clear], torch.isfinite(t_ref)[clear])
    both = clear & torch.isfinite(t)
    assert both.sum() > 100
    assert (t[both].double() - t_ref[both]).abs().max() < 1e-4
    # the reported capsule is the one whose surface the hit point lies on
    p = o[both] + t[both, None] * d[both]
    one = Scene(scene.a[idx[both]], scene.b[idx[both]], scene.radius[idx[both]], scene.albedo)
    pa, ba = p - one.a, one.b - one.a
    hh = ((pa * ba).sum(-1) / (ba * ba).sum(-1)).clamp(0, 1)
    assert ((pa - hh[:, None] * ba).norm(dim=-1) - one.radius).abs().max() < 1e-4


def test_intersection_from_far_cameras_is_accurate():
    """Rays are re-based near the scene, so float32 does not lose the surface at large camera distances."""
    scene = make_hand("fist")
    c2w = poses_deg(30.0, 20.0, r=40.0)[0]
    o, d = get_rays(c2w, INTR)
    t, _ = intersect_capsules(o.reshape(-1, 3), d.reshape(-1, 3), scene)
    hit = torch.isfinite(t)
    assert hit.any()
    p = o.reshape(-1, 3)[hit] + t[hit, None] * d.reshape(-1, 3)[hit]
    assert scene_sdf(scene, p).abs().max() < 1e-4


def test_supersampling_gives_fractional_alpha_and_matches_coverage():
    scene = make_hand("palm")
    c2w = poses_deg(20.0, 10.0)
    a1 = render_scene(scene, c2w, INTR, supersample=1)[..., 3]
    a4 = render_scene(scene, c2w, INTR, supersample=4)[..., 3]
    assert set(a1.unique().tolist()) <= {0.0, 1.0}
    assert ((a4 > 0) & (a4 < 1)).sum() > 20
    # same covered area up to the anti-aliased edge
    assert abs(float(a1.sum() - a4.sum())) < 0.1 * float(a4.sum())
    alpha, _ = render_alpha_depth(scene, c2w, INTR, supersample=4)
    assert torch.equal(alpha, a4)


def test_single_pose_and_light_options():
    scene = make_hand("fist")
    c2w = poses_deg(0.0, 10.0)[0]
    img = render_scene(scene, c2w, INTR)
    assert img.shape == (1, 64, 64, 4)
    dark = render_scene(scene, c2w, INTR, ambient=0.0, light_dir=(-1.0, 0.0, 0.0))  # light from behind
    cover = img[0, ..., 3] > 0.99
    assert dark[0, ..., :3][cover].mean() < 0.5 * img[0, ..., :3][cover].mean()
    assert torch.equal(dark[..., 3], img[..., 3])


def test_deterministic(hands):
    poses = poses_deg([10.0, 200.0], [5.0, 40.0])
    for g in GESTURES:
        assert torch.equal(render_scene(make_hand(g), poses, INTR), render_scene(make_hand(g), poses, INTR))
    j1, j2, j3 = (make_hand("palm", jitter=0.05, seed=s) for s in (1, 1, 2))
    assert torch.equal(j1.a, j2.a) and torch.equal(j1.b, j2.b)
    assert not torch.equal(j1.b, j3.b)
    assert torch.equal(make_hand("palm").b, hands["palm"].b)
    assert bounding_radius(j3) < 1.0


def test_batched_views_match_single_views(monkeypatch):
    scene = make_hand("yeah")
    poses = poses_deg([0.0, 70.0, 150.0, 260.0, 330.0], [10.0, -20.0, 45.0, 5.0, 70.0])
    batch = render_scene(scene, poses, INTR)
    monkeypatch.setattr(render_mod, "_GROUP_RAYS", 2 * 64 * 64 * 4)  # groups of 2 views: 3 groups
    grouped = render_scene(scene, poses, INTR)
    single = torch.cat([render_scene(scene, c2w, INTR) for c2w in poses])
    assert torch.allclose(batch, grouped, atol=1e-6) and torch.allclose(batch, single, atol=1e-6)


def test_unknown_gesture_raises_input_error():
    with pytest.raises(InputError) as err:
        make_hand("thumbs_up")
    assert err.value.field == "gesture"
    assert "thumbs_up" in str(err.value) and "fist, yeah, palm" in str(err.value)
