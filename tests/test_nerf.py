"""Tests of instsim.nerf: encoding, compositing and marching, pose gradients, checkpoints, training, validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instsim.cameras import Intrinsics, pose_from_spherical
from instsim.errors import InputError, InstsimError
from instsim.stages.intrinsics import extract_intrinsics
from instsim.nerf.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint, save_checkpoint
from instsim.nerf.config import NerfConfig, resolve_max_res
from instsim.nerf.encoding import HASH_PRIMES, HashEncoding, HashInterp, sh_encode
from instsim.nerf.metrics import compare_image, mask_iou, psnr, ssim
from instsim.nerf import rendering
from instsim.nerf.network import InstantNerf
from instsim.nerf.normalization import SceneNormalization
from instsim.nerf.occupancy import OccupancyGrid
from instsim.nerf.rendering import composite, march, render, transmittance
from instsim.nerf import train as train_mod
from instsim.nerf.train import train_nerf
from instsim.nerf.validate import convention_check, validate_checkpoint
from instsim.transforms import load_views

BLENDERNERF_TINY = Path(__file__).resolve().parent / "data" / "blendernerf_tiny"

# ---------------------------------------------------------------------------------------------------------
# hash encoding
# ---------------------------------------------------------------------------------------------------------


def _reference_encoding(enc: HashEncoding, x: torch.Tensor) -> torch.Tensor:
    """Direct per-corner trilinear lookup with the textbook dense index and spatial hash (slow, float64)."""
    table = enc.table.detach().double()
    out = torch.zeros(x.shape[0], enc.n_levels, enc.n_features, dtype=torch.float64)
    t = 2**enc.log2_table
    for lvl, res in enumerate(enc.resolutions):
        for n, p in enumerate(x.double()):
            pos = p * res
            i0 = torch.clamp(torch.floor(pos), 0, res - 1)
            f = pos - i0
            for a in (0, 1):
                for b in (0, 1):
                    for c in (0, 1):
                        v = [int(i0[0]) + a, int(i0[1]) + b, int(i0[2]) + c]
                        if enc.dense[lvl]:
                            row = v[0] + v[1] * (res + 1) + v[2] * (res + 1) ** 2
                        else:
                            row = ((v[0] * HASH_PRIMES[0]) ^ (v[1] * HASH_PRIMES[1]) ^ (v[2] * HASH_PRIMES[2])) % t
                        w = (f[0] if a else 1 - f[0]) * (f[1] if b else 1 - f[1]) * (f[2] if c else 1 - f[2])
                        out[n, lvl] += w * table[:, enc.offsets[lvl] + row]
    return out.reshape(x.shape[0], -1)


def test_hash_encoding_matches_direct_lookup_dense_and_hashed():
    torch.manual_seed(0)
    enc = HashEncoding(n_levels=5, n_features=2, log2_table=10, base_res=4, max_res=40).double()
    assert 0 < enc.n_dense < enc.n_levels  # both kinds of level are exercised
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = torch.rand(9, 3, dtype=torch.float64)
    x[0] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # cube faces
    assert torch.allclose(enc(x), _reference_encoding(enc, x), atol=1e-12)


def test_dense_levels_equal_trilinear_grid_sample():
    """A dense level is a plain (N+1)^3 vertex grid: torch's grid_sample (align_corners) must agree."""
    torch.manual_seed(1)
    enc = HashEncoding(n_levels=3, n_features=2, log2_table=16, base_res=5, max_res=20).double()
    assert all(enc.dense)
    with torch.no_grad():
        enc.table.normal_()
    x = torch.rand(50, 3, dtype=torch.float64)
    out = enc(x).view(50, 3, 2)
    for lvl, res in enumerate(enc.resolutions):
        v = res + 1
        grid = enc.table[:, enc.offsets[lvl] : enc.offsets[lvl + 1]].detach().view(2, v, v, v)  # (F, z, y, x)
        ref = F.grid_sample(grid[None], (x * 2 - 1).view(1, 1, 1, 50, 3), align_corners=True)  # x->W, y->H, z->D
        assert torch.allclose(out[:, lvl], ref.view(2, 50).T, atol=1e-12)


def test_hash_encoding_gradients_table_and_positions():
    torch.manual_seed(2)
    enc = HashEncoding(n_levels=4, n_features=2, log2_table=8, base_res=3, max_res=30).double()
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    x = torch.rand(6, 3, dtype=torch.float64)
    idx, frac = enc.corners(x)
    table = enc.table.detach().clone().requires_grad_()
    frac = frac.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, f: HashInterp.apply(t, idx, f), (table, frac))
    # positions through the whole encoding (away from cell faces, where trilinear blending has kinks)
    xg = (torch.rand(5, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(enc, (xg,))
    # the table gradient equals autograd through plain indexing
    y = enc(x)
    g = torch.randn_like(y)
    (gt,) = torch.autograd.grad((y * g).sum(), enc.table)
    ref_table = enc.table.detach().clone().requires_grad_()
    enc2 = HashEncoding(4, 2, 8, 3, 30).double()
    enc2.table = torch.nn.Parameter(ref_table)
    i2, f2 = enc2.corners(x)
    corners = ref_table[:, i2.view(-1)].view(2, *i2.shape)  # (F, L, 8, N)
    fx, fy, fz = f2
    w = torch.stack([(fx if a else 1 - fx) * (fy if b else 1 - fy) * (fz if c else 1 - fz)
                     for a in (0, 1) for b in (0, 1) for c in (0, 1)], dim=1)
    ref = (corners * w).sum(2).permute(2, 1, 0).reshape(x.shape[0], -1)
    (gr,) = torch.autograd.grad((ref * g).sum(), ref_table)
    assert torch.allclose(gt, gr, atol=1e-12)


def test_sh_degree4_is_orthonormal():
    d = torch.randn(400_000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = d / d.norm(dim=-1, keepdim=True)
    y = sh_encode(d)
    gram = 4 * math.pi * (y.T @ y) / d.shape[0]
    assert y.shape == (d.shape[0], 16)
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=0.03)


# ---------------------------------------------------------------------------------------------------------
# compositing and marching
# ---------------------------------------------------------------------------------------------------------


def test_composite_density_step_gives_expected_opacity_and_depth():
    dt, s, t0 = 0.01, 30.0, 1.0
    n_before, n_after = 50, 40
    t = torch.arange(n_before + n_after, dtype=torch.float64) * dt + t0 - n_before * dt
    sigma = torch.where(t >= t0 - 1e-12, s, 0.0).double()
    # two rays, the second one is the first shifted by 0.5: the segmented sums must not mix them
    ray = torch.cat([torch.zeros(len(t)), torch.ones(len(t))]).long()
    out = composite(torch.cat([sigma, sigma]), torch.ones(2 * len(t), 3, dtype=torch.float64),
                    torch.cat([t, t + 0.5]), dt, ray, 2)
    q = math.exp(-s * dt)
    opacity = 1 - q**n_after
    # discrete expected depth: sum_k (t0 + k dt) (1 - q) q^k over the n_after slab samples
    depth = sum((t0 + k * dt) * (1 - q) * q**k for k in range(n_after))
    assert out["opacity"].tolist() == pytest.approx([opacity, opacity], abs=1e-12)
    assert out["depth"].tolist() == pytest.approx([depth, depth + 0.5 * opacity], abs=1e-12)
    assert torch.allclose(out["rgb"], out["opacity"][:, None].expand(2, 3))
    # transmittance restarts at 1 on every ray
    trans = transmittance(torch.cat([sigma, sigma]) * dt, ray, 2)
    assert trans[0] == 1 and trans[len(t)] == 1


def _block_grid(res: int = 32) -> OccupancyGrid:
    grid = OccupancyGrid(res)
    occ = torch.zeros(res, res, res, dtype=torch.bool)
    occ[12:20, 12:20, 12:20] = True  # the block [-0.25, 0.25)^3
    grid.occupied = occ.view(-1)
    grid.refresh()
    return grid


def test_march_skips_empty_cells():
    grid = _block_grid()
    dt = 2 * math.sqrt(3) / 512
    o = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 0.6, 0.0], [-3.0, 0.1, 0.05]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    s = march(grid, o, d, dt)
    pts = o[s.ray] + s.t[:, None] * d[s.ray]
    assert grid.is_occupied(pts).all()  # no sample in an empty cell
    counts = torch.bincount(s.ray, minlength=3)
    assert counts[1] == 0  # the ray passing beside the block has no samples at all
    expect = int(0.5 / dt)  # the block is 0.5 long along x
    assert abs(int(counts[0]) - expect) <= 1 and abs(int(counts[2]) - expect) <= 1
    assert torch.all(s.t[1:][s.ray[1:] == s.ray[:-1]] > s.t[:-1][s.ray[1:] == s.ray[:-1]])  # sorted along rays


def _random_model(dtype=torch.float64, seed: int = 0) -> InstantNerf:
    torch.manual_seed(seed)
    cfg = NerfConfig.cpu(n_levels=4, log2_table=10, base_res=4, max_res=32, hidden_dim=16, grid_res=16, march_steps=128)
    model = InstantNerf(cfg, SceneNormalization.from_bound([0.1, -0.2, 0.05], 1.3)).to(dtype)
    with torch.no_grad():
        model.encoding.table.uniform_(-2, 2)  # a textured field, so colours vary with the pose
    return model.eval()


def test_render_shapes_uv_and_batches():
    model = _random_model(torch.float32)
    intr = Intrinsics.from_fov(12, 10, 0.7)
    poses = pose_from_spherical(torch.tensor([0.3, 2.0]), torch.tensor([0.2, -0.4]), torch.tensor([3.5, 3.0])).float()
    full = render(model, poses, intr, background="white")
    assert full["rgb"].shape == (2, 10, 12, 3) and full["opacity"].shape == (2, 10, 12)
    assert not full["rgb"].requires_grad
    uv = torch.tensor([[0.5, 0.5], [5.5, 3.5], [11.5, 9.5]])
    part = render(model, poses[1], intr, background="white", uv=uv)
    ref = full["rgb"][1][[0, 3, 9], [0, 5, 11]]
    assert torch.allclose(part["rgb"], ref, atol=1e-5)
    # chunking does not change the result
    small = render(model, poses[1], intr, background="white", chunk=7)
    assert torch.allclose(small["rgb"], full["rgb"][1], atol=1e-5)


@pytest.mark.parametrize("cuda_kernels", [False, True])
def test_render_honours_the_callers_chunk(monkeypatch, cuda_kernels):
    """``chunk`` bounds the rays per pass on both paths (the CUDA path used to raise it to 2^18 / 2^21 silently);
    without one, each path takes its default. The CUDA branch is exercised on the CPU by stubbing the pass."""
    passes: list[int] = []

    def counting_pass(model, o, d):
        passes.append(o.shape[0])
        return {"rgb": o.new_zeros(o.shape[0], 3), "opacity": o.new_zeros(o.shape[0]), "depth": o.new_zeros(o.shape[0])}

    monkeypatch.setattr(rendering, "render_rays", counting_pass)
    monkeypatch.setattr(InstantNerf, "uses_cuda_kernels", property(lambda self: cuda_kernels))
    model = _random_model(torch.float32)
    intr = Intrinsics.from_fov(40, 30, 0.7)
    pose = pose_from_spherical(torch.tensor(0.3), torch.tensor(0.2), torch.tensor(3.0)).float()
    render(model, pose, intr, chunk=500)
    assert passes == [500, 500, 200]
    passes.clear()
    render(model, pose, intr)
    assert passes == [1200] and rendering.default_chunk(cuda_kernels, False) >= 1200
    assert rendering.default_chunk(True, False) == 2**21 and rendering.default_chunk(True, True) == 2**18
    assert rendering.default_chunk(False, True) == 2**15
    with pytest.raises(ValueError, match="chunk"):
        render(model, pose, intr, chunk=0)


# ---------------------------------------------------------------------------------------------------------
# pose gradients
# ---------------------------------------------------------------------------------------------------------


def test_render_gradient_wrt_azimuth_matches_finite_differences():
    model = _random_model(torch.float64)
    intr = Intrinsics.from_fov(16, 16, 0.7)
    uv = torch.tensor([[u + 0.5, v + 0.5] for u in (3, 7, 8, 12) for v in (4, 8, 11)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    w_rgb = torch.rand(len(uv), 3, generator=gen, dtype=torch.float64)
    w_op = torch.rand(len(uv), generator=gen, dtype=torch.float64)
    w_d = torch.rand(len(uv), generator=gen, dtype=torch.float64)
    el, r = torch.tensor(0.35, dtype=torch.float64), torch.tensor(3.2, dtype=torch.float64)
    centre = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)

    def f(az: torch.Tensor) -> torch.Tensor:
        out = render(model, pose_from_spherical(az, el, r, centre), intr, uv=uv, background=(0.2, 0.5, 0.9))
        return (out["rgb"] * w_rgb).sum() + (out["opacity"] * w_op).sum() + 0.1 * (out["depth"] * w_d).sum()

    az = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(f(az), az)
    # float64 allows a tiny step; the sample set (fixed lattice from the camera) does not change over it
    h = 1e-6
    with torch.no_grad():
        fd = (f(torch.tensor(0.8 + h, dtype=torch.float64)) - f(torch.tensor(0.8 - h, dtype=torch.float64))) / (2 * h)
    assert abs(float(grad)) > 1e-3  # a real signal, not 0 == 0
    assert float(grad) == pytest.approx(float(fd), rel=1e-5)


def test_batched_pose_gradients_reach_every_pose():
    model = _random_model(torch.float64)
    intr = Intrinsics.from_fov(8, 8, 0.7)
    az = torch.tensor([0.1, 1.5, 3.0], dtype=torch.float64, requires_grad=True)
    poses = pose_from_spherical(az, torch.full((3,), 0.3, dtype=torch.float64), torch.full((3,), 3.0, dtype=torch.float64))
    out = render(model, poses, intr, background="black")
    out["rgb"].sum().backward()
    assert az.grad is not None and torch.isfinite(az.grad).all() and (az.grad.abs() > 0).all()


# ---------------------------------------------------------------------------------------------------------
# config and normalization
# ---------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_unknown_key():
    cfg = NerfConfig.cpu(steps=10)
    assert NerfConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="nerf.log2_tabel"):
        NerfConfig.from_dict({"log2_tabel": 12})
    with pytest.raises(InputError, match="nerf.grid_decay"):
        NerfConfig.from_dict({"grid_decay": 1.5})


def test_normalization_and_max_res_come_from_the_cameras():
    info = extract_intrinsics(BLENDERNERF_TINY / "transforms_train.json")
    norm = SceneNormalization.from_intrinsics(info)
    assert norm.bound == pytest.approx(info["scene"]["bound"]) and norm.scale * norm.bound == pytest.approx(1.0)
    lo, hi = torch.tensor(info["scene"]["aabb_min"]), torch.tensor(info["scene"]["aabb_max"])
    assert (norm.to_nerf(lo).abs() <= 1 + 1e-6).all() and (norm.to_nerf(hi).abs() <= 1 + 1e-6).all()
    p = torch.randn(5, 3)
    assert torch.allclose(norm.to_world(norm.to_nerf(p)), p, atol=1e-6)
    # two cells per pixel footprint at the scene centre
    n_max = resolve_max_res(NerfConfig(), info)
    assert n_max == math.ceil(4 * info["scene"]["bound"] * info["fl_x"] / info["radius"]["min"])


# ---------------------------------------------------------------------------------------------------------
# training, checkpoints, validation (one short training shared by the tests below)
# ---------------------------------------------------------------------------------------------------------

SMOKE_STEPS = 240


@pytest.fixture(scope="module")
def tiny():
    train = load_views(BLENDERNERF_TINY / "transforms_train.json")
    test = load_views(BLENDERNERF_TINY / "transforms_test.json")
    info = extract_intrinsics(BLENDERNERF_TINY / "transforms_train.json")
    return train, test, info


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    train, test, info = tiny
    out = tmp_path_factory.mktemp("nerf")
    # one thread: robust on a CPU shared with other jobs, where two threads can stall each other
    cfg = NerfConfig.cpu(steps=SMOKE_STEPS, checkpoint_every=100, log_every=20, threads=1)
    summary = train_nerf(train, info, cfg, out / "nerf.pt", out / "train_log.tsv", progress=False)
    return out, cfg, summary


def test_short_training_learns_the_tiny_blendernerf_scene(trained, tiny):
    out, _, summary = trained
    _, test, _ = tiny
    assert summary["finished"] and summary["step"] == SMOKE_STEPS
    model, _ = load_checkpoint(out / "nerf.pt")
    res = validate_checkpoint(model, test, background="white", min_psnr=22.0, comparison_dir=out / "cmp")
    # an empty (all white) render scores about 14 dB on these views; seeds 0-2 gave 27.4-28.8 dB
    assert res["psnr"] > 22.0 and res["passed"], res["psnr"]
    assert 0.8 < res["ssim"] <= 1 and res["mask_iou"] > 0.85
    assert len(res["per_view"]) == len(test.poses)
    strip = (out / "cmp" / "0001.png")
    assert strip.is_file()
    log = (out / "train_log.tsv").read_text().splitlines()
    assert log[0].split("\t")[:5] == ["step", "loss", "psnr", "rays_per_s", "occupied_fraction"]
    assert [int(r.split("\t")[0]) for r in log[1:]] == list(range(20, SMOKE_STEPS + 1, 20))
    assert summary["occupied_fraction"] < 0.2  # the grid pruned empty space


def test_checkpoint_round_trip(trained, tiny):
    out, cfg, _ = trained
    _, test, info = tiny
    model, meta = load_checkpoint(out / "nerf.pt")
    assert meta["format_version"] == FORMAT_VERSION and meta["step"] == SMOKE_STEPS
    assert meta["normalization"]["bound"] == pytest.approx(info["scene"]["bound"])
    assert meta["config"]["log2_table"] == cfg.log2_table and meta["intrinsics"]["w"] == 64
    assert meta["config"]["max_res"] == resolve_max_res(cfg, info)
    copy = out / "copy.pt"
    save_checkpoint(copy, model, step=meta["step"], intrinsics=test.intrinsics)
    again, meta2 = load_checkpoint(copy)
    assert torch.equal(again.occupancy.occupied, model.occupancy.occupied)
    a = render(model, test.poses[0], test.intrinsics)["rgb"]
    b = render(again, test.poses[0], test.intrinsics)["rgb"]
    # loaded weights are frozen: a pose-gradient render reaches the pose and leaves the weights without .grad
    pose = test.poses[0].clone().requires_grad_(True)
    render(again, pose, test.intrinsics, uv=torch.tensor([[32.0, 32.0], [30.5, 33.5]]))["opacity"].sum().backward()
    assert pose.grad is not None and all(p.grad is None and not p.requires_grad for p in again.parameters())
    assert torch.equal(a, b)


def test_checkpoint_expect_mismatch_lists_every_field(trained):
    out, _, _ = trained
    with pytest.raises(InstsimError) as e:
        load_checkpoint(out / "nerf.pt", expect={"bound": 2.0, "config.log2_table": 19, "intrinsics": {"w": 800}})
    msg = str(e.value)
    assert "bound: checkpoint 1.26596, expected 2" in msg
    assert "config.log2_table: checkpoint 15, expected 19" in msg
    assert "intrinsics.w: checkpoint 64, expected 800" in msg
    load_checkpoint(out / "nerf.pt", expect={"bound": 1.2659573714860595, "n_levels": 16})  # matching: fine


def test_truncated_and_foreign_checkpoints_fail_clearly(trained, tmp_path):
    out, _, _ = trained
    data = (out / "nerf.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InstsimError, match="truncated or corrupt"):
        load_checkpoint(bad)
    state = read_checkpoint(out / "nerf.pt")
    state["format_version"] = FORMAT_VERSION + 1
    future = tmp_path / "future.pt"
    torch.save(state, future)
    with pytest.raises(InstsimError, match=f"format version {FORMAT_VERSION + 1}"):
        load_checkpoint(future)
    with pytest.raises(InstsimError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_training_resumes_from_its_checkpoint(tiny, tmp_path):
    train, _, info = tiny
    cfg = NerfConfig.cpu(steps=30, checkpoint_every=10, log_every=5, grid_warmup=4, grid_update_every=4, threads=1)
    ckpt, log = tmp_path / "nerf.pt", tmp_path / "train_log.tsv"
    first = train_nerf(train, info, cfg, ckpt, log, progress=False, max_steps=20)  # "killed" after 20 steps
    assert not first["finished"] and read_checkpoint(ckpt)["step"] == 20
    with log.open("a") as f:  # a row the killed run logged after its last checkpoint
        f.write("25\t0.1\t10\t1\t1\t1\t1\t0.01\t1\n")
    second = train_nerf(train, info, cfg, ckpt, log, progress=False)
    assert second["start_step"] == 20 and second["step"] == 30 and second["finished"]
    steps = [int(r.split("\t")[0]) for r in log.read_text().splitlines()[1:]]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert read_checkpoint(ckpt)["step"] == 30
    # a finished checkpoint is not trained again; other construction settings refuse to resume
    assert train_nerf(train, info, cfg, ckpt, log, progress=False)["steps_run"] == 0
    with pytest.raises(InstsimError, match="log2_table: checkpoint 15, expected 12"):
        train_nerf(train, info, cfg.replace(log2_table=12, steps=40), ckpt, log, progress=False)


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(tiny, tmp_path, monkeypatch):
    train, _, info = tiny
    real = train_mod.render_rays
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 12:
            out["rgb"] = out["rgb"] * float("nan")
        return out

    monkeypatch.setattr(train_mod, "render_rays", poisoned)
    cfg = NerfConfig.cpu(steps=30, checkpoint_every=10, grid_warmup=4, grid_update_every=4, threads=1)
    with pytest.raises(InstsimError, match="at step 12"):
        train_nerf(train, info, cfg, tmp_path / "nerf.pt", tmp_path / "log.tsv", progress=False)
    assert read_checkpoint(tmp_path / "nerf.pt")["step"] == 10


def test_convention_check_passes_and_catches_a_flipped_camera(trained, tiny):
    out, _, _ = trained
    _, test, _ = tiny
    model, _ = load_checkpoint(out / "nerf.pt")
    poses, alpha = test.poses[:5], test.images[:5, ..., 3]
    ok = convention_check(model, poses, test.intrinsics, alpha, min_iou=0.85)
    assert ok["passed"], ok["iou"]
    opencv = poses.clone()
    opencv[:, :3, 1:3] *= -1  # an OpenCV-convention pose read as OpenGL: the camera looks away
    bad = convention_check(model, opencv, test.intrinsics, alpha)
    assert not bad["passed"] and bad["min_iou"] < 0.5


def test_metrics():
    a = np.random.default_rng(0).random((16, 16, 3))
    assert psnr(a, a) == 100.0 and ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, np.clip(a + 0.1, 0, 1)) < 25
    strip = compare_image(a, a)
    assert strip.shape == (16, 48, 3) and strip.dtype == np.uint8 and strip[:, 32:].max() == 0
    m = np.zeros((4, 4))
    m[:2] = 1
    assert mask_iou(m, m) == 1.0 and mask_iou(m, 1 - m) == 0.0
