"""Neural-Sim's outer loop (instsim.neuralsim.loop): gradients through the NeRF to psi, the loop moving psi toward a
target, resume after a kill, the control (psi frozen), config validation and non-finite values.

The loop tests use the real detector at a tiny size and a cheap stand-in renderer (a soft disk whose colour
depends on the camera's elevation, differentiable with respect to the pose) instead of a NeRF: a NeRF
render with gradient costs ~0.1 s per 64 px image on this CPU, too slow for dozens of iterations in a unit
test. The NeRF path (relaxed poses -> centre translation -> NeRF render -> composite) is covered by the
finite-difference test on a random float64 NeRF.
"""

from __future__ import annotations

import math

import pytest
import torch

from instsim.cameras import Intrinsics

from instsim.poses import PoseSpace
from instsim.detect import DetectorConfig
from instsim.errors import ConfigError
from instsim.nerf.config import NerfConfig
from instsim.nerf.network import InstantNerf
from instsim.nerf.normalization import SceneNormalization
from instsim.neuralsim import PoseDistribution, draw_noise
from instsim.neuralsim.estimator import pathwise_input_grads
from instsim.neuralsim.config import NeuralSimConfig, psi_lr_at
from instsim.neuralsim.loop import optimize_distribution
from instsim.neuralsim.objective import ValSet
from instsim.neuralsim.samples import ClassRenderers, ClassSamples, draw_samples, render_relaxed
from instsim.neuralsim.step import BilevelProblem, NeuralSimError
from instsim.neuralsim.trajectory import trajectory_columns
from instsim.synthesis import DetectionCamera

F64 = torch.float64


# thousands of small ops on two shared cores: one torch thread per test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------
# gradient of a NeRF render with respect to psi
# ---------------------------------------------------------------------------------------------------------


def random_nerf(centre) -> InstantNerf:
    torch.manual_seed(0)
    cfg = NerfConfig.cpu(n_levels=4, log2_table=10, base_res=4, max_res=32, hidden_dim=16, grid_res=16, march_steps=128)
    model = InstantNerf(cfg, SceneNormalization.from_bound(list(centre), 1.3)).to(F64)
    with torch.no_grad():
        model.encoding.table.uniform_(-2, 2)  # a textured field: colours and opacity vary with the pose
    return model.eval()


def test_render_gradient_wrt_psi_through_the_nerf_matches_finite_differences():
    space = PoseSpace.from_config({"azimuth": {"bins": 8, "low": 0.0, "high": 360.0},
                                   "elevation": {"bins": 3, "low": -30.0, "high": 60.0},
                                   "zoom": {"bins": 3, "low": 2.8, "high": 4.0}})
    centre = torch.tensor([0.1, -0.2, 0.05], dtype=F64)
    model = random_nerf(centre)
    gen = torch.Generator().manual_seed(1)
    dist = PoseDistribution(space, ["obj"], learned=["azimuth", "elevation", "zoom"], dtype=F64)
    with torch.no_grad():
        for p in dist.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
    intr = Intrinsics.from_fov(10, 10, math.radians(40.0))
    n = 2
    samples = ClassSamples(draw_noise(space, n, gen), torch.tensor([[1.0, -2.0], [0.0, 1.0]]), torch.rand(n, 10, 10, 3, generator=gen))
    weights = torch.rand(n, 3, 10, 10, generator=gen, dtype=F64)
    tau = 0.7  # soft samples: every bin's logit moves the pose

    renders = ClassRenderers({"obj": model}, {"obj": centre}, DetectionCamera(intr, 0.0), {"obj": 1.0})

    def f() -> torch.Tensor:
        images, _ = render_relaxed(renders, dist, "obj", samples, tau, "soft", requires_grad=True)
        return (images * weights).sum()

    params = list(dist.parameters())
    grads = torch.autograd.grad(f(), params)
    with torch.no_grad():
        frozen, boxes = render_relaxed(renders, dist, "obj", samples, tau, "soft")
        again, _ = render_relaxed(renders, dist, "obj", samples, tau, "soft", requires_grad=True)
    assert not frozen.requires_grad and frozen.shape == (n, 3, 10, 10)
    assert torch.equal(frozen, again.detach())  # the gradient re-render is the no-grad render
    assert (boxes[:, 2] > 0).all()  # the object is in view
    h = 1e-6
    fd = []
    with torch.no_grad():
        for p in params:
            g = torch.zeros_like(p)
            for i in range(p.numel()):
                p.view(-1)[i] += h
                up = f()
                p.view(-1)[i] -= 2 * h
                down = f()
                p.view(-1)[i] += h
                g.view(-1)[i] = (up - down) / (2 * h)
            fd.append(g)
    for name, g, want in zip(("azimuth", "elevation", "zoom"), grads, fd):
        assert g.abs().max() > 1e-3, name  # a real signal through the NeRF, not 0 == 0
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), (name, g, want)


# ---------------------------------------------------------------------------------------------------------
# the loop on a stand-in renderer
# ---------------------------------------------------------------------------------------------------------


class Disk(torch.nn.Module):
    """Stand-in for a NeRF: a soft disk at the look-at centre, radius ~ 1 / camera distance, colour from blue
    (camera at -30 deg elevation) to orange (60 deg). Rendered by :func:`disk_renderer`."""

    def __init__(self, centre: torch.Tensor, radius: float = 0.6) -> None:
        super().__init__()
        self.register_buffer("centre", torch.as_tensor(centre, dtype=torch.float32))
        self.radius = radius
        self.dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # dtype/device like a NeRF


def disk_renderer(model: Disk, c2w: torch.Tensor, intr: Intrinsics, shifts: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    rel = c2w[:, :3, 3] - model.centre.to(c2w.dtype)
    dist = rel.norm(dim=-1)
    elevation = torch.asin((rel[:, 2] / dist).clamp(-1, 1))
    s = ((elevation - math.radians(-30.0)) / math.radians(90.0)).clamp(0, 1)[:, None]
    colour = s * torch.tensor([0.95, 0.35, 0.05], dtype=c2w.dtype) + (1 - s) * torch.tensor([0.05, 0.35, 0.95], dtype=c2w.dtype)
    r_px = intr.fl_x * model.radius / dist
    v, u = torch.meshgrid(torch.arange(intr.h, dtype=c2w.dtype) + 0.5, torch.arange(intr.w, dtype=c2w.dtype) + 0.5, indexing="ij")
    cx = intr.cx + shifts[:, 0].to(c2w.dtype)
    cy = intr.cy + shifts[:, 1].to(c2w.dtype)
    rho = torch.sqrt((u[None] - cx[:, None, None]) ** 2 + (v[None] - cy[:, None, None]) ** 2)
    opacity = torch.sigmoid((r_px[:, None, None] - rho) / 0.7)
    return torch.cat([colour[:, None, None, :] * opacity[..., None], opacity[..., None]], dim=-1)


SPACE = PoseSpace.from_config({"azimuth": {"bins": 4, "low": 0.0, "high": 360.0},
                               "elevation": {"bins": 4, "low": -30.0, "high": 60.0},
                               "zoom": {"bins": 1, "low": 3.0, "high": 3.4}})
TARGET = {"azimuth": [0.25] * 4, "elevation": [0.05, 0.05, 0.1, 0.8], "zoom": [1.0]}
TARGET_CFG = {"image_size": 32, "fov_deg": 40.0, "max_shift": 0.15}
DETECTOR = DetectorConfig(image_size=32, num_classes=1, width=8, head_width=8, batch_size=16, warmup_steps=2, seed=0)


@pytest.fixture(scope="module")
def disk_problem():
    return make_disk_problem()


def make_disk_problem():
    """The stand-in class and its target/val set: 40 images at the target distribution (mostly high, orange).
    Returns ``(renders, val)``; also used by tests/reliability's kill-and-resume worker."""
    centres = {"disk": torch.tensor([0.1, -0.1, 0.0])}
    # the stand-in's zoom is in world units: a training-camera distance of 1
    renders = ClassRenderers({"disk": Disk(centres["disk"])}, centres, DetectionCamera.from_target_config(TARGET_CFG),
                             {"disk": 1.0}, disk_renderer)
    target = PoseDistribution(SPACE, ["disk"], learned=["elevation"], init={"disk": TARGET})
    samples = draw_samples(SPACE, ["disk"], 40, renders.camera, torch.Generator().manual_seed(123))["disk"]
    images, boxes = render_relaxed(renders, target, "disk", samples, 0.05, "soft")
    val = ValSet(images, [b[None] for b in boxes], [torch.tensor([0]) for _ in boxes])
    return renders, val


def disk_bilevel(disk_problem, device: str = "cpu", renderer=None) -> BilevelProblem:
    """The stand-in problem as Neural-Sim's :class:`BilevelProblem` (optionally with another renderer)."""
    renders, val = disk_problem
    if renderer is not None:
        renders = ClassRenderers(renders.models, renders.centres, renders.camera, renders.radii, renderer)
    return BilevelProblem(renders, SPACE, val, DETECTOR, TARGET, torch.device(device))


def _cfg(**kw) -> NeuralSimConfig:
    # the stand-in's settings, written out (not the library defaults, which are the default run's)
    base = {"iterations": 30, "images_per_class": 32, "inner_steps": 5, "inner_lr": 1e-3, "learned": ["elevation"],
            "pretrain_steps": 0, "psi_lr": 0.1, "eval_every": 10, "checkpoint_every": 2, "seed": 0,
            "temperature": 0.5, "relaxation": "soft", "reset_detector": False, "estimator": "pathwise"}
    base.update(kw)
    return NeuralSimConfig.from_dict(base)


def _run(disk_problem, cfg, device: str = "cpu", renderer=None, **kw):
    return optimize_distribution(disk_bilevel(disk_problem, device, renderer), cfg, progress=False,
                                 log_fn=lambda msg: None, **kw)


def test_loop_moves_psi_toward_the_target(disk_problem, tmp_path):
    dist, _, rows = _run(disk_problem, _cfg(), log_tsv=tmp_path / "trajectory.tsv")
    tv0, tv1 = rows[0]["tv_to_target"], rows[-1]["tv_to_target"]
    assert tv0 == pytest.approx(0.55)  # uniform elevation vs the target
    assert tv1 <= 0.5 * tv0, [round(r["tv_to_target"], 3) for r in rows]
    assert dist.probs("disk")["elevation"].argmax() == 3
    # the trajectory file: a row per iteration plus the initial state, probabilities per bin, AP every 10
    lines = (tmp_path / "trajectory.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header == trajectory_columns(dist) and "p_disk_elevation_3" in header and "p_disk_azimuth_0" not in header
    assert len(lines) == 1 + 1 + 30
    last = dict(zip(header, lines[-1].split("\t")))
    assert float(last["p_disk_elevation_3"]) == pytest.approx(float(dist.probs("disk")["elevation"][3].detach()), abs=1e-5)
    assert [r["iteration"] for r in rows if r["val_AP"] is not None] == [0, 1, 10, 20, 30]
    assert all(r["grad_norm"] > 0 for r in rows[1:])


@pytest.mark.parametrize("relaxation", ["straight_through", "neighbour_st"])
def test_loop_with_a_hard_forward_relaxation_moves_psi_toward_the_target(disk_problem, relaxation):
    """The straight-through variants render only hard samples of psi and still descend L_val."""
    dist, _, rows = _run(disk_problem, _cfg(relaxation=relaxation, temperature=1.0))
    tv0, tv1 = rows[0]["tv_to_target"], rows[-1]["tv_to_target"]
    assert tv1 <= 0.6 * tv0, [round(r["tv_to_target"], 3) for r in rows]
    assert dist.probs("disk")["elevation"].argmax() == 3


def test_loop_with_the_sign_dropped_moves_psi_away(disk_problem, monkeypatch):
    """The published code's sign error (ascending L_val): the same loop drives psi away from the target, so the
    test above measures the hypergradient, not a bias of the sampler or renderer."""
    from instsim.neuralsim import hypergradient

    def flipped(*a, **k):
        gx, gb = pathwise_input_grads(*a, **k)
        return -gx, None if gb is None else -gb

    monkeypatch.setattr(hypergradient, "pathwise_input_grads", flipped)
    _, _, rows = _run(disk_problem, _cfg(iterations=10))
    assert rows[-1]["tv_to_target"] > rows[0]["tv_to_target"] + 0.1, [round(r["tv_to_target"], 3) for r in rows]


# zoom: the disk's size (and so its box) changes with the camera distance; the target wants it close and large
ZOOM_SPACE = PoseSpace.from_config({"azimuth": {"bins": 1, "low": 0.0, "high": 360.0},
                                    "elevation": {"bins": 1, "low": 20.0, "high": 40.0},
                                    "zoom": {"bins": 3, "low": 2.0, "high": 5.0}})
ZOOM_TARGET = {"azimuth": [1.0], "elevation": [1.0], "zoom": [0.8, 0.1, 0.1]}


@pytest.fixture(scope="module")
def zoom_problem() -> BilevelProblem:
    renders, _ = make_disk_problem()
    target = PoseDistribution(ZOOM_SPACE, ["disk"], learned=["zoom"], init={"disk": ZOOM_TARGET})
    samples = draw_samples(ZOOM_SPACE, ["disk"], 40, renders.camera, torch.Generator().manual_seed(321))["disk"]
    images, boxes = render_relaxed(renders, target, "disk", samples, 1.0, "straight_through")
    val = ValSet(images, [b[None] for b in boxes], [torch.tensor([0]) for _ in boxes])
    assert boxes[:, 2].max() > 1.5 * boxes[:, 2].min()  # the box follows zoom: a size the detector must learn
    return BilevelProblem(renders, ZOOM_SPACE, val, DETECTOR, ZOOM_TARGET)


@pytest.mark.parametrize("estimator", ["pathwise", "score_function"])
def test_loop_learns_zoom_where_the_box_changes_with_it(zoom_problem, estimator):
    """Zoom changes the disk's size, hence its box: both estimators that account for the labels (the box term of the
    pathwise one, or the score function, which needs none) move zoom toward the close bin the target holds."""
    cfg = _cfg(learned=["zoom"], relaxation="straight_through", temperature=2.0, estimator=estimator, iterations=25,
               psi_lr=0.15)
    dist, _, rows = optimize_distribution(zoom_problem, cfg, progress=False, log_fn=lambda msg: None)
    tv = [round(r["tv_to_target"], 3) for r in rows]
    assert tv[0] == pytest.approx(0.4667, abs=1e-3)  # uniform over 3 bins vs 0.8 / 0.1 / 0.1
    assert tv[-1] <= 0.6 * tv[0], tv
    assert int(dist.probs("disk")["zoom"].argmax()) == 0, tv


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine runs it)")
def test_loop_with_the_detector_on_the_gpu_follows_the_cpu_run(disk_problem):
    cfg = _cfg(iterations=3, pretrain_steps=20, pretrain_images_per_class=16, eval_every=1)
    runs = {dev: _run(disk_problem, cfg, device=dev) for dev in ("cpu", "cuda")}
    (d_cpu, det_cpu, rows_cpu), (d_gpu, det_gpu, rows_gpu) = runs["cpu"], runs["cuda"]
    assert next(det_gpu.parameters()).device.type == "cpu"  # handed back on the CPU
    # the same samples and batches: psi and the validation losses agree up to float rounding
    p_cpu, p_gpu = d_cpu.probs("disk")["elevation"].detach(), d_gpu.probs("disk")["elevation"].detach()
    assert torch.allclose(p_gpu, p_cpu, atol=1e-3), (p_cpu, p_gpu)
    assert [r["val_loss"] for r in rows_gpu] == pytest.approx([r["val_loss"] for r in rows_cpu], rel=1e-3)


def test_control_keeps_psi_exactly_at_its_init(disk_problem):
    init = {"disk": {"azimuth": [0.25] * 4, "elevation": [0.4, 0.3, 0.2, 0.1], "zoom": [1.0]}}
    start = PoseDistribution(SPACE, ["disk"], learned=["elevation"], init=init)
    dist, _, rows = _run(disk_problem, _cfg(iterations=4), update_psi=False, init=init)
    for a, b in zip(dist.parameters(), start.parameters()):
        assert torch.equal(a, b)
    assert {r["p_disk_elevation_0"] for r in rows} == {rows[0]["p_disk_elevation_0"]}
    assert all(r["grad_norm"] is None for r in rows)  # the hypergradient is not computed
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # the detector still fine-tunes


def test_reset_detector_restarts_every_iteration_from_the_warm_start(disk_problem):
    """With reset_detector and no inner steps the detector never leaves the warm start (every row's val loss is
    row 0's) while psi still moves; without reset the inner steps accumulate."""
    _, _, rows = _run(disk_problem, _cfg(iterations=3, inner_steps=0, reset_detector=True, pretrain_steps=3,
                                              pretrain_images_per_class=8))
    assert {r["val_loss"] for r in rows} == {rows[0]["val_loss"]}
    assert all(r["grad_norm"] > 0 for r in rows[1:]) and rows[-1]["tv_to_target"] != rows[0]["tv_to_target"]
    _, _, reset_rows = _run(disk_problem, _cfg(iterations=3, inner_steps=3, reset_detector=True))
    _, _, kept_rows = _run(disk_problem, _cfg(iterations=3, inner_steps=3))
    assert reset_rows[1]["val_loss"] == kept_rows[1]["val_loss"]  # the first iteration is the same either way
    assert reset_rows[3]["val_loss"] != kept_rows[3]["val_loss"]  # then 3 steps from the start vs 9 in all


def test_cosine_psi_lr_schedule_anneals_the_steps_and_still_descends(disk_problem):
    """psi_lr_schedule cosine: psi_lr at the first iteration, falling to ~0 at the last (Adam's steps shrink with it,
    the last one a tiny fraction of the first), and psi still moves toward the target."""
    cfg = _cfg(psi_lr=0.2, psi_lr_schedule="cosine")
    lrs = [psi_lr_at(cfg, t) for t in range(1, cfg.iterations + 1)]
    assert lrs[0] == pytest.approx(0.2) and lrs[cfg.iterations // 2] == pytest.approx(0.1)
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.002
    assert psi_lr_at(_cfg(psi_lr=0.2), 30) == 0.2  # constant: the default
    _, _, rows = _run(disk_problem, cfg)
    tv = [r["tv_to_target"] for r in rows]
    assert tv[-1] <= 0.6 * tv[0], [round(t, 3) for t in tv]
    step = [max(abs(rows[i][k] - rows[i - 1][k]) for k in rows[i] if k.startswith("p_disk_elevation"))
            for i in range(1, len(rows))]
    assert step[-1] < 0.05 * max(step[:5]), step


@pytest.mark.parametrize("reset", [False, True])
def test_resume_after_a_kill_gives_the_same_final_psi(disk_problem, tmp_path, reset):
    cfg = _cfg(iterations=6, images_per_class=8, inner_steps=2, eval_every=3, checkpoint_every=2, reset_detector=reset,
               pretrain_steps=3 if reset else 0, pretrain_images_per_class=8)
    ref_dist, ref_det, ref_rows = _run(disk_problem, cfg)

    class Killed(Exception):
        pass

    def kill_at_5(row):
        if row["iteration"] == 5:
            raise Killed

    ckpt, tsv = tmp_path / "resume" / "state.pt", tmp_path / "resume" / "trajectory.tsv"
    with pytest.raises(Killed):
        _run(disk_problem, cfg, checkpoint_path=ckpt, log_tsv=tsv, on_iteration=kill_at_5)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 4  # the last periodic checkpoint
    dist, det, rows = _run(disk_problem, cfg, checkpoint_path=ckpt, log_tsv=tsv)
    for a, b in zip(dist.parameters(), ref_dist.parameters()):
        assert torch.equal(a, b)
    for (name, a), b in zip(det.state_dict().items(), ref_det.state_dict().values()):
        assert torch.equal(a, b), name
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]
    assert untimed(rows) == untimed(ref_rows)
    assert len(tsv.read_text().splitlines()) == 1 + 1 + 6
    # a finished checkpoint just loads; another config is refused by name
    again, _, _ = _run(disk_problem, cfg, checkpoint_path=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), ref_dist.parameters()))
    with pytest.raises(ConfigError, match="config"):
        _run(disk_problem, _cfg(iterations=6, images_per_class=8, inner_steps=3, reset_detector=reset,
                                pretrain_steps=3 if reset else 0, pretrain_images_per_class=8), checkpoint_path=ckpt)
    with pytest.raises(ConfigError, match="update_psi"):
        _run(disk_problem, cfg, checkpoint_path=ckpt, update_psi=False)


def test_non_finite_gradient_stops_with_a_clear_error_and_keeps_the_checkpoint(disk_problem, tmp_path):
    calls = {"grad": 0}

    def broken(model, c2w, intr, shifts, requires_grad):
        out = disk_renderer(model, c2w, intr, shifts, requires_grad)
        if requires_grad:
            calls["grad"] += 1
            if calls["grad"] > 3:  # iteration 4's re-render (one chunk per iteration)
                out = out * torch.tensor(float("nan"))
        return out

    ckpt = tmp_path / "state.pt"
    cfg = _cfg(iterations=6, images_per_class=8, inner_steps=1, checkpoint_every=2)
    with pytest.raises(NeuralSimError, match=r"iteration 4.*not finite.*iteration 2\) is kept"):
        _run(disk_problem, cfg, renderer=broken, checkpoint_path=ckpt)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2


def test_config_from_dict_names_the_bad_key():
    cfg = NeuralSimConfig.from_dict({"iterations": 3, "inverse_hvp": {"method": "cg", "k": 4}})
    assert cfg.iterations == 3 and cfg.inverse_hvp.method == "cg" and cfg.inverse_hvp.damping == 0.01
    assert NeuralSimConfig.from_dict(cfg.to_dict()) == cfg
    assert NeuralSimConfig.from_dict(None) == NeuralSimConfig()
    for bad, key in (({"iteratons": 3}, "neuralsim.iteratons"), ({"inverse_hvp": {"method": "lissa"}}, "neuralsim.inverse_hvp.method"),
                     ({"inverse_hvp": {"kk": 3}}, "neuralsim.inverse_hvp.kk"), ({"learned": ["roll"]}, "neuralsim.learned"),
                     ({"temperature": 0}, "neuralsim.temperature"), ({"images_per_class": 2.5}, "neuralsim.images_per_class"),
                     ({"grad_clip": -1}, "neuralsim.grad_clip"), ({"learned": "azimuth"}, "neuralsim.learned"),
                     ({"relaxation": "circular"}, "neuralsim.relaxation"), ({"reset_detector": 1}, "neuralsim.reset_detector"),
                     ({"psi_lr_schedule": "linear"}, "neuralsim.psi_lr_schedule")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            NeuralSimConfig.from_dict(bad)
