"""instsim.neuralsim core: pose distribution, relaxed sampling, implicit gradients, and a synthetic outer loop.

No NeRF and no detector: the implicit gradient is checked against finite differences of closed-form
(weighted) ridge regression, and the outer loop runs on 1-D "images" made from the sampled poses.
"""

import json
import math

import pytest
import torch

from instsim.poses import BinnedFactor, PoseSample, PoseSpace
from instsim.errors import InputError
from instsim.neuralsim import (
    RELAXATIONS,
    PoseDistribution,
    RelaxedSample,
    draw_noise,
    hard_bins,
    hvp,
    implicit_gradient,
    implicit_image_grad,
    inverse_hvp,
    is_circular,
    make_hvp,
    param_grad,
    poses_from_values,
    relaxed_pose_values,
    relaxed_poses,
    to_pose_sample,
    tv_distance,
    value_bins,
)

F64 = torch.float64


def _space(az_low: float = 0.0, az_high: float = 360.0) -> PoseSpace:
    return PoseSpace(
        BinnedFactor("azimuth", az_low, az_high, 8),
        BinnedFactor("elevation", -30.0, 60.0, 3),
        BinnedFactor("zoom", 2.6, 4.4, 3),
    )


TARGET = {
    "azimuth": [0.02, 0.02, 0.02, 0.02, 0.3, 0.4, 0.2, 0.02],
    "elevation": [1 / 3, 1 / 3, 1 / 3],
    "zoom": [1 / 3, 1 / 3, 1 / 3],
}


# ---------------------------------------------------------------------------------------------------------
# distribution
# ---------------------------------------------------------------------------------------------------------


def test_distribution_defaults_learn_every_factor_and_start_uniform():
    dist = PoseDistribution(_space(), ["fist", "train"])  # "train" would clash with nn.Module.train as an attribute
    params = dict(dist.named_parameters())
    assert len(params) == 6 and sorted(p.shape[0] for p in params.values()) == [3, 3, 3, 3, 8, 8]
    assert dist.learned == ("azimuth", "elevation", "zoom")
    for c in dist.classes:
        probs = dist.probs(c)
        for f, bins in (("azimuth", 8), ("elevation", 3), ("zoom", 3)):
            assert torch.allclose(probs[f].double(), torch.full((bins,), 1.0 / bins, dtype=F64), atol=1e-7)
            assert probs[f].requires_grad
        assert set(dist.learned_parameters(c)) == {"azimuth", "elevation", "zoom"}
    one = PoseDistribution(_space(), ["fist"], learned=["azimuth"])  # a fixed factor has no parameter
    assert one.probs("fist")["azimuth"].requires_grad and not one.probs("fist")["elevation"].requires_grad
    with pytest.raises(KeyError):
        dist.probs("mug")


def test_distribution_init_json_round_trip_and_state_dict():
    init = {"fist": {"azimuth": TARGET["azimuth"], "zoom": [0.5, 0.5, 0.0]}}
    dist = PoseDistribution(_space(), ["fist", "palm"], learned=["zoom", "azimuth"], init=init, dtype=F64)
    assert dist.learned == ("azimuth", "zoom")  # canonical factor order
    p = dist.probs("fist")
    assert torch.allclose(p["azimuth"], torch.tensor(TARGET["azimuth"], dtype=F64), atol=1e-12)
    assert torch.isfinite(dist.logits("fist")["zoom"]).all()  # a zero probability gives a finite logit
    assert float(p["zoom"][2].detach()) < 1e-5

    d = json.loads(json.dumps(dist.to_dict()))
    assert set(d) == {"classes", "pose_space", "learned"} and d["learned"] == ["azimuth", "zoom"]
    assert d["pose_space"] == _space().to_dict()
    back = PoseDistribution.from_dict(d, source="distribution.json", dtype=F64)
    for c in ("fist", "palm"):
        for f, q in back.probs(c).items():
            assert torch.allclose(q, dist.probs(c)[f], atol=1e-9), (c, f)

    other = PoseDistribution(_space(), ["fist", "palm"], learned=["azimuth", "zoom"], dtype=F64)
    other.load_state_dict(dist.state_dict())
    assert torch.allclose(other.probs("fist")["azimuth"], p["azimuth"])


def test_distribution_rejects_bad_input_naming_the_field():
    with pytest.raises(InputError, match="neuralsim.learned"):
        PoseDistribution(_space(), ["fist"], learned=["roll"])
    with pytest.raises(InputError, match="init.fist.azimuth"):
        PoseDistribution(_space(), ["fist"], init={"fist": {"azimuth": [0.5, 0.5]}})
    good = PoseDistribution(_space(), ["fist"]).to_dict()
    bad = json.loads(json.dumps(good))
    bad["classes"]["fist"]["elevation"] = [0.5, 0.6, 0.1]
    with pytest.raises(InputError) as err:
        PoseDistribution.from_dict(bad, source="d.json")
    assert err.value.file == "d.json" and err.value.field == "classes.fist.elevation"
    del bad["learned"]
    with pytest.raises(InputError, match="learned"):
        PoseDistribution.from_dict(bad, source="d.json")


def test_tv_distance_per_factor_and_mean():
    uniform = _space().uniform()
    per, mean = tv_distance(uniform, TARGET)
    assert per["azimuth"] == pytest.approx(0.525)
    assert per["elevation"] == pytest.approx(0.0) and per["zoom"] == pytest.approx(0.0)
    assert mean == pytest.approx(0.525 / 3)
    per, mean = tv_distance(uniform, TARGET, factors=["azimuth"])
    assert mean == pytest.approx(0.525)
    assert tv_distance({"a": [1.0, 0.0]}, {"a": [0.0, 1.0]})[1] == pytest.approx(1.0)
    tv = PoseDistribution(_space(), ["fist", "palm"], learned=["azimuth"]).tv_to(TARGET)  # the learned factors by default
    assert tv["mean"] == pytest.approx(0.525) and tv["per_class"]["palm"] == {"azimuth": pytest.approx(0.525)}


# ---------------------------------------------------------------------------------------------------------
# relaxed sampling
# ---------------------------------------------------------------------------------------------------------


def _logits(gen: torch.Generator, space: PoseSpace, dtype=F64) -> dict:
    return {f: torch.randn(space.factor(f).bins, generator=gen, dtype=dtype).requires_grad_(True) for f in space.FACTORS}


@pytest.mark.parametrize("hard", [False, True])
def test_same_noise_gives_identical_values_and_poses(hard):
    space, gen = _space(), torch.Generator().manual_seed(0)
    dist = PoseDistribution(space, ["fist"], init={"fist": TARGET})
    noise = draw_noise(space, 32, gen)
    with torch.no_grad():
        v0, c2w0 = relaxed_poses(dist, "fist", noise, 0.5, hard=hard)
    v1, c2w1 = relaxed_poses(dist, "fist", noise, 0.5, hard=hard)
    assert c2w1.requires_grad and c2w0.shape == (32, 4, 4)
    assert torch.equal(c2w0, c2w1.detach())
    for f in space.FACTORS:
        assert torch.equal(v0[f], v1[f].detach())
    # stored noise survives a save/load and chunking
    noise2 = RelaxedSample.from_tensors({k: t.clone() for k, t in noise.to_tensors().items()})
    v2 = relaxed_pose_values(dist.logits("fist"), noise2[8:16], 0.5, space, hard=hard)
    assert torch.equal(v2["azimuth"].detach(), v0["azimuth"][8:16])
    assert len(noise2[3]) == 1 and noise2.n == 32


@pytest.mark.parametrize("hard", [False, True])
def test_relaxed_values_have_finite_nonzero_gradients(hard):
    space, gen = _space(), torch.Generator().manual_seed(1)
    logits = _logits(gen, space)
    noise = draw_noise(space, 64, gen)
    values = relaxed_pose_values(logits, noise, 0.7, space, hard=hard)
    c2w = poses_from_values(values)
    (c2w * torch.randn(c2w.shape, generator=gen, dtype=F64)).sum().backward()
    for f in space.FACTORS:
        g = logits[f].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, f


def test_low_temperature_lands_in_gumbel_max_bin_with_jitter_inside():
    space, gen = _space(), torch.Generator().manual_seed(2)
    logits = _logits(gen, space)
    noise = draw_noise(space, 500, gen)
    want = hard_bins(logits, noise)
    for tau, hard in ((1e-6, False), (1.0, True)):
        values = relaxed_pose_values(logits, noise, tau, space, hard=hard)
        got = value_bins(values, space)
        for f in space.FACTORS:
            fac = space.factor(f)
            assert torch.equal(got[f], want[f]), (f, tau, hard)
            expected = fac.value(want[f], noise.jitter[f])  # the hard sampler's value
            assert torch.allclose(values[f].detach(), expected, atol=1e-6), (f, tau, hard)
    # Gumbel-max bins follow the categorical: frequencies match softmax(logits)
    big = draw_noise(space, 20000, gen)
    counts = torch.bincount(hard_bins(logits, big)["azimuth"], minlength=8).double() / 20000
    assert torch.allclose(counts, torch.softmax(logits["azimuth"].detach(), -1), atol=0.015)


def test_azimuth_wraps_around():
    space = _space()
    fac = space.azimuth
    assert is_circular(fac) and not is_circular(space.elevation)
    assert not is_circular(_space(0.0, 180.0).azimuth)  # not a full turn: averaged linearly
    gen = torch.Generator().manual_seed(3)
    # mass split between the first (0..45 deg) and last (315..360 deg) bins: neighbours on the circle
    az = torch.full((8,), -math.inf, dtype=F64)
    az[0] = az[7] = 0.0
    logits = {"azimuth": az.requires_grad_(True), "elevation": torch.zeros(3, dtype=F64), "zoom": torch.zeros(3, dtype=F64)}
    noise = draw_noise(space, 400, gen)
    values = relaxed_pose_values(logits, noise, 1.0, space)
    v = values["azimuth"].detach()
    assert ((v >= 0) & (v < 360)).all()
    assert set(value_bins(values, space)["azimuth"].tolist()) <= {0, 7}  # never near 180 (a linear mean's answer)
    dist_to_zero = torch.minimum(v, 360 - v)
    assert dist_to_zero.max() <= 45.0 + 1e-9
    values["azimuth"].sum().backward()
    assert torch.isfinite(az.grad).all() and az.grad.abs().max() > 0
    # poses are continuous across the seam: 359.9 and 0.1 degrees give nearly the same camera
    c2w = poses_from_values({"azimuth": torch.tensor([359.9, 0.1], dtype=F64),
                             "elevation": torch.zeros(2, dtype=F64), "zoom": torch.full((2,), 3.0, dtype=F64)})
    assert (c2w[0] - c2w[1]).abs().max() < 0.02


@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_every_relaxation_is_reproducible_differentiable_and_hard_at_low_temperature(relaxation):
    space, gen = _space(), torch.Generator().manual_seed(5)
    logits = _logits(gen, space)
    noise = draw_noise(space, 200, gen)
    v0 = relaxed_pose_values(logits, noise, 0.5, space, relaxation=relaxation)
    v1 = relaxed_pose_values(logits, noise, 0.5, space, relaxation=relaxation)
    poses_from_values(v0)[:, :3, 3].sum().backward()
    for f in space.FACTORS:
        assert torch.equal(v0[f].detach(), v1[f].detach())
        assert torch.isfinite(logits[f].grad).all() and logits[f].grad.abs().max() > 0, (relaxation, f)
    want = hard_bins(logits, noise)
    cold = relaxed_pose_values(logits, noise, 1e-4, space, relaxation=relaxation)
    for f in space.FACTORS:
        expected = space.factor(f).value(want[f], noise.jitter[f])  # the hard sampler's value
        assert torch.allclose(cold[f].detach(), expected, atol=1e-6), (relaxation, f)


def test_neighbour_relaxation_moves_at_most_one_bin_toward_the_neighbours_only():
    space, gen = _space(), torch.Generator().manual_seed(6)
    logits = _logits(gen, space)
    noise = draw_noise(space, 300, gen)
    k = hard_bins(logits, noise)
    values = relaxed_pose_values(logits, noise, 2.0, space, relaxation="neighbour")
    for f in space.FACTORS:
        fac = space.factor(f)
        hard = fac.value(k[f], noise.jitter[f])
        shift = values[f].detach() - hard
        if is_circular(fac):
            shift = torch.remainder(shift + 180.0, 360.0) - 180.0
        assert (shift.abs() <= fac.width + 1e-9).all(), f
        if not is_circular(fac):  # no neighbour past the ends: never pushed outside the range's end bins
            assert (shift[k[f] == 0] >= -1e-12).all() and (shift[k[f] == fac.bins - 1] <= 1e-12).all(), f
    # one sample's gradient reaches only its Gumbel-max bin and the two bins next to it (wrapping for azimuth)
    for i in range(20):
        az = logits["azimuth"]
        (g,) = torch.autograd.grad(values["azimuth"][i], az, retain_graph=True)
        kk = int(k["azimuth"][i])
        allowed = {(kk - 1) % 8, kk, (kk + 1) % 8}
        assert {b for b in range(8) if g[b] != 0} <= allowed and g.abs().sum() > 0
        # raising the next bin's logit turns the view toward it
        assert g[(kk + 1) % 8] > 0 and g[(kk - 1) % 8] < 0


def test_neighbour_relaxation_wraps_across_the_seam():
    space = _space()
    az = torch.full((8,), -20.0, dtype=F64)
    az[0] = az[7] = 0.0
    logits = {"azimuth": az.requires_grad_(True), "elevation": torch.zeros(3, dtype=F64), "zoom": torch.zeros(3, dtype=F64)}
    values = relaxed_pose_values(logits, draw_noise(space, 400, torch.Generator().manual_seed(7)), 1.0, space,
                                 relaxation="neighbour")
    v = values["azimuth"].detach()
    assert ((v >= 0) & (v < 360)).all()
    assert (torch.minimum(v, 360 - v) <= 67.5 + 1e-9).all()  # bin 0 or 7 plus at most one bin toward the other


def test_neighbour_st_renders_exactly_the_hard_sample_with_the_neighbour_gradient():
    space, gen = _space(), torch.Generator().manual_seed(8)
    logits = _logits(gen, space)
    noise = draw_noise(space, 50, gen)
    k = hard_bins(logits, noise)
    st = relaxed_pose_values(logits, noise, 0.7, space, relaxation="neighbour_st")
    soft = relaxed_pose_values(logits, noise, 0.7, space, relaxation="neighbour")
    for f in space.FACTORS:
        assert torch.allclose(st[f].detach(), space.factor(f).value(k[f], noise.jitter[f]), atol=1e-9)
        (g_st,) = torch.autograd.grad(st[f].sum(), logits[f], retain_graph=True)
        (g_soft,) = torch.autograd.grad(soft[f].sum(), logits[f], retain_graph=True)
        assert torch.allclose(g_st, g_soft)


def test_unknown_relaxation_is_refused():
    space = _space()
    with pytest.raises(ValueError, match="relaxation"):
        relaxed_pose_values(_logits(torch.Generator().manual_seed(0), space), draw_noise(space, 2, torch.Generator()),
                            0.5, space, relaxation="circular")


def test_pose_sample_view_and_hard_sampling_from_distribution():
    space, gen = _space(), torch.Generator().manual_seed(4)
    dist = PoseDistribution(space, ["fist"], init={"fist": TARGET})
    noise = draw_noise(space, 16, gen)
    values, c2w = relaxed_poses(dist, "fist", noise, 0.3, class_radius=2.5)
    ps = to_pose_sample(values, space)
    assert isinstance(ps, PoseSample) and ps.azimuth_bin.dtype == torch.int64
    assert torch.allclose(ps.poses(2.5), c2w.detach().float(), atol=1e-5)
    # zoom is relative: the camera sits at zoom * the class's training-camera distance
    assert torch.allclose(c2w[:, :3, 3].detach().norm(dim=-1), 2.5 * values["zoom"].detach(), atol=1e-6)
    hard = dist.sample("fist", 4000, gen)
    freq = torch.bincount(hard.azimuth_bin, minlength=8).double() / 4000
    assert torch.allclose(freq, torch.tensor(TARGET["azimuth"], dtype=F64), atol=0.03)


# ---------------------------------------------------------------------------------------------------------
# Hessian-vector products and inverse-HVP
# ---------------------------------------------------------------------------------------------------------


def test_hvp_matches_explicit_hessian():
    gen = torch.Generator().manual_seed(5)
    w1 = torch.randn(3, 2, generator=gen, dtype=F64, requires_grad=True)
    b1 = torch.randn(3, generator=gen, dtype=F64, requires_grad=True)
    unused = torch.randn(4, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(10, 2, generator=gen, dtype=F64)

    def loss(p):
        return torch.tanh(x @ p[0].T + p[1]).pow(2).sum() + (p[1] ** 4).sum()  # b1 also linear-free, non-quadratic

    params = (w1, b1, unused)
    vec = tuple(torch.randn(p.shape, generator=gen, dtype=F64) for p in params)
    hv = hvp(loss, params, vec)
    flat = lambda w, b: loss((w.view(3, 2), b, unused))  # noqa: E731
    h = torch.autograd.functional.hessian(flat, (w1.detach().flatten(), b1.detach()))
    h = torch.cat([torch.cat([h[0][0], h[0][1]], 1), torch.cat([h[1][0], h[1][1]], 1)], 0)
    want = h @ torch.cat([vec[0].flatten(), vec[1]])
    assert torch.allclose(torch.cat([hv[0].flatten(), hv[1]]), want, atol=1e-10)
    assert torch.equal(hv[2], torch.zeros(4, dtype=F64))  # unused parameter: zero row


def test_inverse_hvp_methods_on_spd_matrix():
    gen = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.linspace(0.5, 4.0, 6, dtype=F64)) @ q.T
    v = (torch.randn(6, generator=gen, dtype=F64),)
    fn = lambda vec: (a @ vec[0],)  # noqa: E731
    for damping in (0.0, 0.3):
        want = torch.linalg.solve(a + damping * torch.eye(6, dtype=F64), v[0])
        cg = inverse_hvp(fn, v, "cg", k=6, damping=damping)[0]
        assert torch.allclose(cg, want, atol=1e-9)
        neu = inverse_hvp(fn, v, "neumann", k=300, alpha=1.0 / (4.0 + damping), damping=damping)[0]
        assert torch.allclose(neu, want, atol=1e-9)
    assert torch.equal(inverse_hvp(fn, v, "identity")[0], v[0])
    with pytest.raises(ValueError, match="unknown"):
        inverse_hvp(fn, v, "lissa")
    with pytest.warns(RuntimeWarning, match="non-positive"):
        u = inverse_hvp(lambda vec: (-vec[0],), v, "cg", k=3)
    assert torch.equal(u[0], v[0])


def test_neumann_curvature_guard_keeps_the_sign_where_the_fixed_step_flips_it():
    """lambda_max = 250: the old fixed step (alpha 0.01, k 5) returns about -10x H^-1 v along the top eigenvector
    (sign flipped, finite); with the power-iteration guard every eigen-component keeps the sign of H^-1 v."""
    from instsim.neuralsim.implicit import INVERSE_HVP_METHODS

    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    eigs = torch.tensor([1.0, 3.0, 10.0, 40.0, 100.0, 250.0], dtype=F64)
    a = q @ torch.diag(eigs) @ q.T
    v = (q @ torch.tensor([1.0, -1.0, 2.0, 0.5, -1.5, 1.0], dtype=F64),)
    fn = lambda vec: (a @ vec[0],)  # noqa: E731
    exact = q.T @ torch.linalg.solve(a, v[0])  # H^-1 v in the eigenbasis
    old = q.T @ inverse_hvp(fn, v, "neumann", k=5, alpha=0.01)[0]
    assert old[-1] * exact[-1] < 0 and float(old[-1] / exact[-1]) == pytest.approx(-10.4, abs=0.1)
    info: dict = {}
    guarded = q.T @ inverse_hvp(fn, v, "neumann", k=5, alpha=0.01, damping=0.01, power_iters=8, info=info)[0]
    assert (guarded * exact > 0).all(), (guarded, exact)
    assert info["lambda_max"] == pytest.approx(250.01, rel=0.02) and info["alpha"] <= 1.0 / info["lambda_max"] + 1e-15
    assert info["hvps"] == 5 + 8
    # a step already below 1/lambda_max is kept as given
    small: dict = {}
    inverse_hvp(fn, v, "neumann", k=2, alpha=1e-3, power_iters=4, info=small)
    assert small["alpha"] == 1e-3
    cg_info: dict = {}
    cg = q.T @ inverse_hvp(fn, v, "cg", k=6, damping=0.0, info=cg_info)[0]
    assert torch.allclose(cg, exact, rtol=1e-6) and cg_info["iterations"] == 6
    assert INVERSE_HVP_METHODS == ("identity", "neumann", "cg")


# ---------------------------------------------------------------------------------------------------------
# implicit gradient vs finite differences: weighted ridge regression with a closed-form inner solution
# ---------------------------------------------------------------------------------------------------------


class Ridge:
    """theta*(psi) = argmin_theta (1/n) sum_i w_i (x_i.theta - y_i)^2 + lam |theta|^2, w = n softmax(psi);
    validation: mean squared error on a shifted set."""

    def __init__(self, lam: float, n: int = 12, d: int = 4, seed: int = 7) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.lam, self.n, self.d = lam, n, d
        self.x = torch.randn(n, d, generator=gen, dtype=F64)
        theta_true = torch.randn(d, generator=gen, dtype=F64)
        self.y = self.x @ theta_true + 0.3 * torch.randn(n, generator=gen, dtype=F64)
        self.xv = torch.randn(20, d, generator=gen, dtype=F64) + 0.8  # shifted inputs
        self.yv = self.xv @ (theta_true + 0.5) + 0.1 * torch.randn(20, generator=gen, dtype=F64)
        self.psi0 = 0.5 * torch.randn(n, generator=gen, dtype=F64)

    def weights(self, psi):
        return self.n * torch.softmax(psi, 0)

    def train_loss(self, params, psi):
        (theta,) = params
        return (self.weights(psi[0]) * (self.x @ theta - self.y) ** 2).mean() + self.lam * (theta**2).sum()

    def val_loss(self, params):
        (theta,) = params
        return ((self.xv @ theta - self.yv) ** 2).mean()

    def theta_star(self, psi):
        w = self.weights(psi)
        a = (self.x.T * w) @ self.x / self.n + self.lam * torch.eye(self.d, dtype=F64)
        return torch.linalg.solve(a, (self.x.T * w) @ self.y / self.n)

    def outer(self, psi):
        return self.val_loss((self.theta_star(psi),))

    def fd_grad(self, psi, eps=1e-6):
        g = torch.zeros_like(psi)
        for i in range(psi.numel()):
            e = torch.zeros_like(psi)
            e[i] = eps
            g[i] = (self.outer(psi + e) - self.outer(psi - e)) / (2 * eps)
        return g

    def hessian_eigs(self, psi):
        w = self.weights(psi)
        a = (self.x.T * w) @ self.x / self.n + self.lam * torch.eye(self.d, dtype=F64)
        return torch.linalg.eigvalsh(2 * a)

    def implicit(self, method, **kw):
        theta = self.theta_star(self.psi0).clone().requires_grad_(True)
        psi = self.psi0.clone().requires_grad_(True)
        return implicit_gradient(self.train_loss, self.val_loss, (theta,), (psi,), method=method, **kw)[0]


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_implicit_gradient_cg_and_neumann_match_finite_differences():
    prob = Ridge(lam=0.05)
    fd = prob.fd_grad(prob.psi0)
    assert fd.norm() > 1e-3
    eigs = prob.hessian_eigs(prob.psi0)
    alpha = 1.0 / float(eigs.max())
    k_neumann = int(math.ceil(math.log(1e-9) / math.log(1 - alpha * float(eigs.min()))))
    neumann = prob.implicit("neumann", k=k_neumann, alpha=alpha)
    cg = prob.implicit("cg", k=prob.d + 2)
    assert _rel_err(cg, fd) < 1e-4
    assert _rel_err(neumann, fd) < 1e-4
    # the sign matters: descending the gradient lowers the validation loss
    assert prob.outer(prob.psi0 - 1e-3 * cg) < prob.outer(prob.psi0)


def test_implicit_gradient_identity_points_the_right_way_when_well_conditioned():
    prob = Ridge(lam=5.0)
    eigs = prob.hessian_eigs(prob.psi0)
    assert eigs.max() / eigs.min() < 1.5  # H ~ 2 lam I
    fd = prob.fd_grad(prob.psi0)
    ident = prob.implicit("identity")
    cosine = float(ident @ fd / (ident.norm() * fd.norm()))
    assert cosine > 0.9


@pytest.mark.parametrize("method", ["neumann", "cg"])
def test_implicit_image_grad_backpropagated_through_images_matches_finite_differences(method):
    """psi reaches the training loss only through the "images" x(psi), as in Neural-Sim."""
    gen = torch.Generator().manual_seed(8)
    n, d, lam = 10, 3, 0.1
    x0 = torch.randn(n, d, generator=gen, dtype=F64)
    dirs = torch.randn(n, d, generator=gen, dtype=F64)
    y = torch.randn(n, generator=gen, dtype=F64)
    xv = torch.randn(15, d, generator=gen, dtype=F64) + 0.5
    yv = torch.randn(15, generator=gen, dtype=F64)
    psi0 = 0.3 * torch.randn(n, generator=gen, dtype=F64)

    def render(psi):  # (n, d) "images" depending on psi
        return x0 + torch.sin(psi)[:, None] * dirs

    def train_loss(params, images):
        return ((images @ params[0] - y) ** 2).mean() + lam * (params[0] ** 2).sum()

    def val_loss(params):
        return ((xv @ params[0] - yv) ** 2).mean()

    def theta_star(psi):
        x = render(psi)
        return torch.linalg.solve(x.T @ x / n + lam * torch.eye(d, dtype=F64), x.T @ y / n)

    def outer(psi):
        return val_loss((theta_star(psi),))

    eps = 1e-6
    fd = torch.stack([(outer(psi0 + eps * e) - outer(psi0 - eps * e)) / (2 * eps) for e in torch.eye(n, dtype=F64)])

    theta = theta_star(psi0).clone().requires_grad_(True)
    with torch.no_grad():
        images = render(psi0)
    v = param_grad(val_loss, (theta,))
    h = make_hvp(lambda p: train_loss(p, images), (theta,))
    u = inverse_hvp(h, v, method, k=200 if method == "neumann" else d, alpha=0.2)
    g = implicit_image_grad(train_loss, (theta,), images, u)
    assert g.shape == images.shape
    psi = psi0.clone().requires_grad_(True)
    render(psi).backward(gradient=g)
    assert _rel_err(psi.grad, fd) < 1e-4
    # the per-image form and the generic form agree
    generic = implicit_gradient(lambda p, s: train_loss(p, render(s[0])), val_loss, (theta,), (psi0.clone().requires_grad_(True),),
                                method=method, k=200 if method == "neumann" else d, alpha=0.2)[0]
    assert torch.allclose(generic, psi.grad, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# synthetic outer loop: psi moves toward the target distribution
# ---------------------------------------------------------------------------------------------------------


def _features(c2w: torch.Tensor) -> torch.Tensor:
    """1-D "images" ``(n, 8)`` from poses: harmonics 1..4 of the camera's azimuth, a smooth function of the
    pose (enough to tell the 8 azimuth bins apart)."""
    c = c2w[:, :3, 3]
    z = torch.complex(c[:, 0], c[:, 1])
    z = z / z.abs()
    return torch.cat([torch.view_as_real(z**k) for k in range(1, 5)], dim=-1)


def _outer_loop(method: str, seed: int, steps: int = 60, k_images: int = 64, tau: float = 0.5, sign: float = 1.0):
    """Neural-Sim on a toy: the "detector" is a prototype theta (8,) with a weighted squared-error training loss
    (so H = diag(2 s) is not the identity); its validation loss on target images is lowest when the training
    images come from the target distribution."""
    space = _space()
    gen = torch.Generator().manual_seed(seed)
    dist = PoseDistribution(space, ["hand"], learned=["azimuth"], dtype=F64)
    target = space.check_probs(TARGET)
    val_images = _features(space.sample(target, 2000, gen).poses(1.0).double())
    s = torch.linspace(0.5, 2.0, 8, dtype=F64)
    theta = torch.zeros(8, dtype=F64, requires_grad=True)

    def train_loss(params, images):
        return (s * (images - params[0]) ** 2).sum(-1).mean()

    def val_loss(params):
        return ((val_images - params[0]) ** 2).sum(-1).mean()

    adam = torch.optim.Adam(dist.parameters(), lr=0.1)
    tv0 = dist.tv_to(target)["mean"]
    for _ in range(steps):
        noise = draw_noise(space, k_images, gen)
        with torch.no_grad():
            _, c2w = relaxed_poses(dist, "hand", noise, tau)
            images = _features(c2w)
        inner = torch.optim.SGD([theta], lr=0.2)  # fine-tune from the previous theta
        for _ in range(10):
            inner.zero_grad()
            train_loss((theta,), images).backward()
            inner.step()
        v = param_grad(val_loss, (theta,))
        u = inverse_hvp(make_hvp(lambda p: train_loss(p, images), (theta,)), v, method, k=5, alpha=0.2)
        g = implicit_image_grad(train_loss, (theta,), images, u)
        _, c2w = relaxed_poses(dist, "hand", noise, tau)  # re-render the stored samples with gradient
        images_psi = _features(c2w)
        assert torch.equal(images_psi.detach(), images)
        adam.zero_grad()
        images_psi.backward(gradient=sign * g)
        torch.nn.utils.clip_grad_norm_(dist.parameters(), 1.0)
        adam.step()
    return tv0, dist.tv_to(target)["mean"]


@pytest.fixture
def one_thread():
    """The toy loop is thousands of tiny ops: intra-op threads only add synchronization (and stall on a
    loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method,seed", [("identity", 0), ("neumann", 1), ("cg", 2)])
def test_outer_loop_moves_psi_toward_target(method, seed, one_thread):
    tv0, tv1 = _outer_loop(method, seed)
    assert tv0 == pytest.approx(0.525)
    assert tv1 <= 0.5 * tv0, (tv0, tv1)


def test_outer_loop_with_the_sign_dropped_moves_away(one_thread):
    """The published code's sign error: ascending L_val drives psi away from the target."""
    tv0, tv1 = _outer_loop("cg", 0, steps=30, sign=-1.0)
    assert tv1 > tv0

