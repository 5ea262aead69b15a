"""Hypergradient estimators (instsim.neuralsim.estimator) on a problem where the box depends on the pose.

The problem: a disk whose size in pixels is ``f R / zoom`` (so its box shrinks as the camera moves away), rendered
with soft edges; a linear "detector" theta regresses the log box width from a pooled image; the inner problem is
ridge regression, so theta*(psi) is closed-form and the true hypergradient ``dL_val/dpsi`` is a finite difference
of ``L_val(theta*(psi))``. Each estimator is checked against it; the fixed-box pathwise estimator (the loop's before
issue #15) is shown to miss it.
"""

from __future__ import annotations

import math

import pytest
import torch

from instsim.cameras import Intrinsics

from instsim.poses import PoseSpace
from instsim.detect.targets import encode_targets, with_box_gradient
from instsim.neuralsim import PoseDistribution, draw_noise, hard_bins, relaxed_poses
from instsim.scene.backgrounds import soft_boxes
from instsim.neuralsim.estimator import (
    BASELINES,
    ESTIMATORS,
    leave_one_out_baseline,
    pathwise_input_grads,
    per_factor_baseline,
    score_function_surrogate,
)
from instsim.neuralsim.implicit import influences, inverse_hvp, make_hvp, param_grad
from instsim.scene.backgrounds import boxes_from_alpha

F64 = torch.float64
SIZE = 24
INTR = Intrinsics.from_fov(SIZE, SIZE, math.radians(40.0))
RADIUS = 0.6  # world units
SPACE = PoseSpace.from_config({"azimuth": {"bins": 1, "low": 0.0, "high": 360.0},
                               "elevation": {"bins": 1, "low": 0.0, "high": 30.0},
                               "zoom": {"bins": 3, "low": 2.6, "high": 4.4}})
LAM = 1e-2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def disk_opacity(distance: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``(n,)`` camera distances -> ``(n, SIZE, SIZE)`` opacity of a disk of radius ``f R / distance`` pixels."""
    r_px = INTR.fl_x * RADIUS / distance
    v, u = torch.meshgrid(torch.arange(SIZE, dtype=F64) + 0.5, torch.arange(SIZE, dtype=F64) + 0.5, indexing="ij")
    cx = torch.full_like(distance, INTR.cx) + (0 if shift is None else shift[:, 0])
    cy = torch.full_like(distance, INTR.cy) + (0 if shift is None else shift[:, 1])
    rho = torch.sqrt((u[None] - cx[:, None, None]) ** 2 + (v[None] - cy[:, None, None]) ** 2)
    return torch.sigmoid((r_px[:, None, None] - rho) / 0.7)


def features(opacity: torch.Tensor) -> torch.Tensor:
    """``(n, H, W)`` -> ``(n, 17)``: 4x4 average-pooled image and a constant."""
    pooled = torch.nn.functional.avg_pool2d(opacity[:, None], SIZE // 4).flatten(1)
    return torch.cat([pooled, torch.ones(len(opacity), 1, dtype=opacity.dtype)], 1)


def ridge_loss(theta: torch.Tensor, opacity: torch.Tensor, boxes: torch.Tensor, weights: torch.Tensor | None = None):
    """Per-sample squared error of the log box width, ``(n,)``."""
    err = features(opacity) @ theta - torch.log(boxes[:, 2])
    return err**2


def solve_ridge(phi: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """argmin sum_i w_i (phi_i . theta - y_i)^2 + LAM |theta|^2 (weights summing to 1)."""
    a = phi.T @ (w[:, None] * phi) + LAM * torch.eye(phi.shape[1], dtype=F64)
    return torch.linalg.solve(a, phi.T @ (w * y))


VAL_DIST = torch.tensor([2.7, 2.8, 3.0, 3.1, 2.9, 4.2], dtype=F64)  # mostly close: the target wants close views
VAL_OPACITY = disk_opacity(VAL_DIST)
VAL_BOXES = soft_boxes(VAL_OPACITY, straight_through=False)


def val_loss(theta: torch.Tensor) -> torch.Tensor:
    return ridge_loss(theta, VAL_OPACITY, VAL_BOXES).mean()


def _dist(logits: list[float]) -> PoseDistribution:
    dist = PoseDistribution(SPACE, ["disk"], learned=["zoom"], dtype=F64)
    with torch.no_grad():
        dist.learned_parameters("disk")["zoom"].copy_(torch.tensor(logits, dtype=F64))
    return dist


def _render(dist: PoseDistribution, noise, tau: float, straight_through: bool):
    _, c2w = relaxed_poses(dist, "disk", noise, tau, relaxation="soft")
    opacity = disk_opacity(c2w[:, :3, 3].norm(dim=-1))
    return opacity, soft_boxes(opacity, straight_through=straight_through)


# ---------------------------------------------------------------------------------------------------------
# boxes with a pose gradient
# ---------------------------------------------------------------------------------------------------------


def test_soft_boxes_match_the_integer_boxes_and_move_with_zoom():
    z = torch.tensor([2.6, 3.0, 3.5, 4.4], dtype=F64, requires_grad=True)
    shift = torch.tensor([[0.0, 0.0], [2.3, -1.7], [-3.1, 0.4], [1.0, 1.0]], dtype=F64)
    opacity = disk_opacity(z, shift)
    hard = soft_boxes(opacity)
    assert torch.equal(hard.detach(), boxes_from_alpha(opacity.detach(), 0.5).to(F64))
    smooth = soft_boxes(opacity, straight_through=False)
    assert (smooth.detach() - hard.detach()).abs().max() <= 1.0
    # the true box width is 2 f R / z: value and derivative
    assert torch.allclose(smooth[:, 2].detach(), 2 * INTR.fl_x * RADIUS / z.detach(), atol=0.15)
    for boxes in (hard, smooth):
        (dw,) = torch.autograd.grad(boxes[:, 2].sum(), z, retain_graph=True)
        want = -2 * INTR.fl_x * RADIUS / z.detach() ** 2
        # linear interpolation between pixel samples of the soft edge: within 20% per image, 10% on average
        assert torch.allclose(dw, want, rtol=0.2), (dw, want)
        assert float(dw.sum() / want.sum()) == pytest.approx(1.0, abs=0.1)
    # nothing above the threshold: a zero box
    assert torch.equal(soft_boxes(torch.zeros(1, 5, 5, dtype=F64)), torch.zeros(1, 4, dtype=F64))


def test_detector_targets_with_box_gradient_equal_the_encoding_and_follow_the_box():
    boxes = torch.tensor([[3.2, 5.1, 9.4, 7.7], [10.0, 2.5, 6.3, 12.2]], dtype=F64, requires_grad=True)
    labels = [torch.tensor([0]), torch.tensor([1])]
    base = encode_targets([b[None] for b in boxes.detach()], labels, 32, 2, 4, dtype=F64)
    diff = with_box_gradient(base, boxes, 4)
    for a, b in zip(diff, base):
        assert torch.allclose(a.detach(), b, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    wsz, woff = torch.randn(base.size.shape, generator=gen, dtype=F64), torch.randn(base.offset.shape, generator=gen, dtype=F64)

    def f(bx):
        t = with_box_gradient(base, bx, 4)
        return (t.size * wsz).sum() + (t.offset * woff).sum()

    (g,) = torch.autograd.grad(f(boxes), boxes)
    h = 1e-6
    fd = torch.zeros_like(g)
    with torch.no_grad():
        for i in range(boxes.numel()):
            e = torch.zeros_like(boxes).view(-1)
            e[i] = h
            fd.view(-1)[i] = (f(boxes + e.view_as(boxes)) - f(boxes - e.view_as(boxes))) / (2 * h)
    assert g.abs().max() > 0.01 and torch.allclose(g, fd, atol=1e-7)
    with pytest.raises(ValueError, match="one box per image"):
        with_box_gradient(base, boxes[:1], 4)


# ---------------------------------------------------------------------------------------------------------
# pathwise, with and without the box term, against finite differences
# ---------------------------------------------------------------------------------------------------------


def _pathwise_problem():
    noise = draw_noise(SPACE, 6, torch.Generator().manual_seed(3))
    tau = 0.8

    def outer(logits: torch.Tensor) -> torch.Tensor:
        dist = _dist(logits.tolist())
        opacity, boxes = _render(dist, noise, tau, straight_through=False)
        w = torch.full((len(opacity),), 1.0 / len(opacity), dtype=F64)
        theta = solve_ridge(features(opacity), torch.log(boxes[:, 2]), w)
        return val_loss(theta)

    return noise, tau, outer


def _fd(outer, logits: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    g = torch.zeros_like(logits)
    with torch.no_grad():
        for i in range(len(logits)):
            e = torch.zeros_like(logits)
            e[i] = h
            g[i] = (outer(logits + e) - outer(logits - e)) / (2 * h)
    return g


@pytest.mark.parametrize("box_term", [True, False])
def test_pathwise_estimator_with_the_box_term_matches_finite_differences(box_term):
    noise, tau, outer = _pathwise_problem()
    logits = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    fd = _fd(outer, logits)
    dist = _dist(logits.tolist())
    with torch.no_grad():
        opacity, boxes = _render(dist, noise, tau, straight_through=False)
    n = len(opacity)
    theta = solve_ridge(features(opacity), torch.log(boxes[:, 2]), torch.full((n,), 1.0 / n, dtype=F64)).requires_grad_(True)

    def train_loss(p, x, b):
        return ridge_loss(p[0], x, b).mean() + LAM * (p[0] ** 2).sum()

    v = param_grad(lambda p: val_loss(p[0]), (theta,))
    u = inverse_hvp(make_hvp(lambda p: train_loss(p, opacity, boxes), (theta,)), v, "cg", k=40)
    gx, gb = pathwise_input_grads(train_loss, (theta,), opacity, boxes, u, box_term=box_term)
    x_psi, b_psi = _render(dist, noise, tau, straight_through=False)
    psi = dist.learned_parameters("disk")["zoom"]
    outs, grads = [x_psi], [gx]
    if box_term:
        assert gb is not None and gb.abs().max() > 0
        outs.append(b_psi)
        grads.append(gb)
    else:
        assert gb is None
    (est,) = torch.autograd.grad(outs, psi, grads)
    rel = float((est - fd).norm() / fd.norm())
    assert fd.norm() > 1e-3
    if box_term:
        assert rel < 1e-4, (est, fd)
    else:  # the label term is most of the gradient here: holding the boxes fixed misses it badly
        assert rel > 0.3, (est, fd)


# ---------------------------------------------------------------------------------------------------------
# score function against finite differences of the exact expectation over the bins
# ---------------------------------------------------------------------------------------------------------


def test_score_function_estimator_matches_finite_differences_of_the_categorical_expectation():
    centres = SPACE.zoom.centres()
    bin_opacity = disk_opacity(centres)
    bin_boxes = soft_boxes(bin_opacity, straight_through=False)
    bin_phi, bin_y = features(bin_opacity), torch.log(bin_boxes[:, 2])

    def outer(logits: torch.Tensor) -> torch.Tensor:
        return val_loss(solve_ridge(bin_phi, bin_y, torch.softmax(logits, 0)))

    logits = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    fd = _fd(outer, logits, 1e-6)
    p = torch.softmax(logits, 0)
    theta = solve_ridge(bin_phi, bin_y, p).requires_grad_(True)
    hvp_fn = make_hvp(lambda t: (p * ridge_loss(t[0], bin_opacity, bin_boxes)).sum() + LAM * (t[0] ** 2).sum(), (theta,))
    u = inverse_hvp(hvp_fn, param_grad(lambda t: val_loss(t[0]), (theta,)), "cg", k=40)
    # the influence of each bin; a sample's is its bin's
    bin_infl = influences(lambda t: ridge_loss(t[0], bin_opacity, bin_boxes), (theta,), u)
    want_infl = -(torch.autograd.functional.jacobian(lambda t: ridge_loss(t, bin_opacity, bin_boxes), theta.detach()) @ u[0])
    assert torch.allclose(bin_infl, want_infl, atol=1e-12)

    dist = _dist(logits.tolist())
    gen = torch.Generator().manual_seed(11)

    def estimate(n: int, baseline: str) -> torch.Tensor:
        noise = draw_noise(SPACE, n, gen)
        bins = hard_bins(dist.logits("disk"), noise)  # Gumbel-max: k ~ p_psi
        surrogate = score_function_surrogate(dist.log_probs("disk"), bins, bin_infl[bins["zoom"]], n, baseline)
        (g,) = torch.autograd.grad(surrogate, dist.learned_parameters("disk")["zoom"])
        return g

    big = estimate(200_000, "leave_one_out")
    assert float((big - fd).norm() / fd.norm()) < 0.02, (big, fd)
    # the baseline: unbiased either way, a lower variance with it
    small = {b: torch.stack([estimate(16, b) for _ in range(400)]) for b in BASELINES}
    for b, draws in small.items():
        se = draws.std(0) / math.sqrt(len(draws))
        assert ((draws.mean(0) - fd).abs() < 4 * se + 1e-9).all(), (b, draws.mean(0), fd, se)
    assert small["leave_one_out"].var(0).sum() < 0.5 * small["none"].var(0).sum()


def test_per_factor_baseline_removes_the_other_factors_noise_and_stays_unbiased():
    """Influences driven mostly by azimuth (large main effects) and a little by zoom: the zoom gradient of the
    exact expectation ``E_psi[I] = sum p_az A + sum p_zoom Z`` is matched by both baselines, with a far lower
    variance for ``per_factor``, which removes the azimuth's effect from the zoom term."""
    space = PoseSpace.from_config({"azimuth": {"bins": 4, "low": 0.0, "high": 360.0},
                                   "elevation": {"bins": 1, "low": 0.0, "high": 30.0},
                                   "zoom": {"bins": 3, "low": 2.6, "high": 4.4}})
    A = torch.tensor([5.0, -3.0, 8.0, -6.0], dtype=F64)
    Z = torch.tensor([0.3, -0.4, 0.1], dtype=F64)
    dist = PoseDistribution(space, ["obj"], learned=["azimuth", "zoom"], dtype=F64)
    with torch.no_grad():
        dist.learned_parameters("obj")["azimuth"].copy_(torch.tensor([0.2, -0.1, 0.0, 0.3], dtype=F64))
        dist.learned_parameters("obj")["zoom"].copy_(torch.tensor([0.3, -0.2, 0.1], dtype=F64))
    zoom = dist.learned_parameters("obj")["zoom"]
    (want,) = torch.autograd.grad((torch.softmax(zoom, 0) * Z).sum(), zoom)
    gen = torch.Generator().manual_seed(5)

    def estimate(baseline: str) -> torch.Tensor:
        bins = hard_bins(dist.logits("obj"), draw_noise(space, 16, gen))
        infl = A[bins["azimuth"]] + Z[bins["zoom"]]
        surrogate = score_function_surrogate(dist.log_probs("obj"), bins, infl, 16, baseline)
        (g,) = torch.autograd.grad(surrogate, zoom)
        return g  # the surrogate's 1/n_total makes it the mean over the samples: an estimate of the expectation's

    draws = {b: torch.stack([estimate(b) for _ in range(1500)]) for b in ("leave_one_out", "per_factor")}
    for b, d in draws.items():
        se = d.std(0) / math.sqrt(len(d))
        assert ((d.mean(0) - want).abs() < 4 * se + 1e-9).all(), (b, d.mean(0), want, se)
    assert draws["per_factor"].var(0).sum() < 0.2 * draws["leave_one_out"].var(0).sum()
    # by hand: sample 0's zoom baseline is the others' mean plus the main effect of its azimuth bin
    v = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=F64)
    bins = {"azimuth": torch.tensor([0, 0, 1, 1]), "zoom": torch.tensor([0, 1, 0, 1])}
    c = per_factor_baseline(v, bins, "zoom")
    assert torch.allclose(c[0], torch.tensor(13.0 / 3 + (2.0 - 13.0 / 3), dtype=F64))
    assert torch.allclose(per_factor_baseline(v, {"zoom": bins["zoom"]}, "zoom"), leave_one_out_baseline(v))


def test_kl_prior_pulls_psi_toward_uniform():
    dist = _dist([1.0, -0.5, 0.2])
    kl = dist.kl_to_uniform()
    p = torch.softmax(torch.tensor([1.0, -0.5, 0.2], dtype=F64), 0)
    assert torch.allclose(kl, (p * torch.log(p * 3)).sum())
    kl.backward()
    g = dist.learned_parameters("disk")["zoom"].grad
    assert g[0] > 0 and g[1] < 0  # descending it lowers the largest logit and raises the smallest
    assert float(_dist([0.0, 0.0, 0.0]).kl_to_uniform()) == pytest.approx(0.0, abs=1e-12)


def test_estimator_names_and_baselines():
    assert ESTIMATORS == ("pathwise", "pathwise_fixed_box", "score_function")
    assert torch.equal(leave_one_out_baseline(torch.tensor([1.0, 2.0, 6.0])), torch.tensor([4.0, 3.5, 1.5]))
    with pytest.raises(ValueError, match="baseline"):
        score_function_surrogate({"zoom": torch.zeros(3)}, {"zoom": torch.zeros(2)}, torch.zeros(2), 2, "mean")
