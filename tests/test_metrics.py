"""instsim.nerf.metrics.ssim against scikit-image's structural_similarity (the definition it reproduces), and
the validation stage's convention-check coverage (render_alpha_depth) against render_scene's alpha."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from instsim.cameras import Intrinsics, pose_from_spherical
from instsim.nerf.metrics import ssim
from instsim.scene import make_hand, render_alpha_depth, render_scene


@pytest.mark.parametrize("size", [(64, 48), (7, 9), (5, 5)])
def test_ssim_is_skimages(size):
    rng = np.random.default_rng(1)
    gt = rng.random((*size, 3))
    pred = np.clip(gt + 0.05 * rng.standard_normal(gt.shape), 0, 1)
    win = min(7, *size)
    win -= 1 - win % 2
    ref = structural_similarity(gt, pred, channel_axis=-1, data_range=1.0, win_size=win)
    assert ssim(pred, gt) == pytest.approx(ref, abs=1e-12)
    assert ssim(torch.from_numpy(pred).float(), torch.from_numpy(gt).float()) == pytest.approx(ref, abs=1e-6)
    assert ssim(gt, gt) == pytest.approx(1.0)


def test_convention_check_coverage_is_render_scenes_alpha():
    intr = Intrinsics.from_fov(24, 24, math.radians(40))
    poses = pose_from_spherical(torch.tensor([0.3, 2.0], dtype=torch.float64), torch.tensor([0.2, -0.4], dtype=torch.float64),
                                torch.tensor([3.0, 3.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)).float()
    scene = make_hand("yeah")
    alpha, _ = render_alpha_depth(scene, poses, intr, supersample=2)
    assert torch.equal(alpha, render_scene(scene, poses, intr, supersample=2)[..., 3])
    assert alpha.max() > 0.5
