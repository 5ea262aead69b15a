"""instsim.synthesis is the one render -> composite -> box path: the strategies' training sets and Neural-Sim's
relaxed samples, rendered at the same poses with the same shifts and backgrounds, give the same images and boxes."""

from __future__ import annotations

import pytest
import torch

from instsim.poses import PoseSpace
from instsim.neuralsim import PoseDistribution, RelaxedSample
from instsim.neuralsim.samples import ClassRenderers, ClassSamples, render_relaxed
from instsim.scene.backgrounds import random_backgrounds
from instsim.seeds import class_seed
from instsim.synthesis import DetectionCamera, draw_shifts, make_synthetic_set
from test_neuralsim_loop import random_nerf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPACE = PoseSpace.from_config({"azimuth": {"bins": 8, "low": 0.0, "high": 360.0},
                               "elevation": {"bins": 3, "low": -30.0, "high": 60.0},
                               "zoom": {"bins": 3, "low": 2.8, "high": 4.0}})


def test_strategy_and_loop_paths_render_the_same_images_and_boxes():
    centre = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    model = random_nerf(centre).float()
    camera = DetectionCamera.from_target_config({"image_size": 16, "fov_deg": 40.0, "max_shift": 0.15})
    n, seed = 5, 3
    probs = SPACE.uniform()
    synth = make_synthetic_set({"obj": model}, {"obj": centre}, {"obj": probs}, SPACE, camera, n, seed, radii={"obj": 1.3})

    # replay the strategy path's draws, and express its poses as relaxed samples that pick the same bins and
    # positions inside them (a Gumbel draw that dominates the logits, the jitter the bin position)
    gen = torch.Generator().manual_seed(class_seed(seed, "obj", "synthetic"))
    sample = SPACE.sample(probs, n, gen)
    shifts = draw_shifts(n, camera.max_shift, gen)
    backgrounds = random_backgrounds(n, camera.size, gen)
    bins = {"azimuth": sample.azimuth_bin, "elevation": sample.elevation_bin, "zoom": sample.zoom_bin}
    values = {"azimuth": sample.azimuth_deg, "elevation": sample.elevation_deg, "zoom": sample.zoom}
    gumbel = {f: 1e3 * torch.nn.functional.one_hot(bins[f], SPACE.factor(f).bins).double() for f in SPACE.FACTORS}
    jitter = {f: (values[f] - SPACE.factor(f).low) / SPACE.factor(f).width - bins[f] for f in SPACE.FACTORS}
    renders = ClassRenderers({"obj": model}, {"obj": centre}, camera, {"obj": 1.3})
    dist = PoseDistribution(SPACE, ["obj"], learned=list(SPACE.FACTORS))
    with torch.no_grad():
        images, boxes = render_relaxed(renders, dist, "obj", ClassSamples(RelaxedSample(gumbel, jitter), shifts, backgrounds),
                                       1.0, "straight_through")
    visible = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    assert int(visible.sum()) == len(synth.images) > 0
    assert torch.equal(boxes[visible], synth.boxes)
    # the same poses up to float rounding of two spherical->pose formulas: images agree to ~1e-6
    assert torch.allclose(images.permute(0, 2, 3, 1)[visible], synth.images, atol=1e-4)
    assert synth.images.std() > 0.02  # a textured render, not two blank images
