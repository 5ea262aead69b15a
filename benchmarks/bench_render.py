"""Benchmark rendering a trained NeRF on a GPU with each backend: inference frames per second, and
pose-gradient rendering (forward + backward to the camera poses) in rays per second.

Usage (checkpoints from ``bench_nerf_train.py --workdir DIR``)::

    python benchmarks/bench_render.py DIR/fist/nerf.pt --size 800 --out benchmarks/results/render_cuda.json

Inference: full ``--size`` x ``--size`` frames at ``--poses`` poses on a ring (elevation 20 degrees, the training
camera distance), median wall time over ``--repeat`` runs after one warm-up, synchronised. Pose gradient:
``--grad-rays`` random pixels spread over the same poses, ``render(..., requires_grad=True)`` then
``backward`` of a weighted sum of colour and opacity to the azimuths; median time of forward + backward, with
the NeRF's weights frozen as Neural-Sim renders them (``--weights-grad``: their gradients computed too).
The two backends' frames are compared (PSNR of one against the other) so a speed-up cannot hide a wrong image.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instsim.cameras import Intrinsics, pose_from_spherical
from instsim.io import write_json
from instsim.nerf.checkpoint import load_checkpoint
from instsim.nerf.network import InstantNerf
from instsim.nerf.rendering import render


def _timed(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up: kernel build/load, allocator, autotuning
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _profile(fn, name: str, rows: int) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    for key in ("cuda_time_total", "cpu_time_total"):
        print(f"[render] {name} pose-gradient step x3, by {key}:")
        print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def _as_backend(model: InstantNerf, name: str, weights_grad: bool) -> InstantNerf:
    other = InstantNerf(model.cfg.replace(backend=name), model.normalization).cuda()
    other.load_state_dict(model.state_dict())
    return other.eval().requires_grad_(weights_grad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--fov", type=float, default=40.0, help="horizontal field of view, degrees")
    ap.add_argument("--radius", type=float, default=3.0, help="camera distance, world units (config.yaml's)")
    ap.add_argument("--poses", type=int, default=4)
    ap.add_argument("--grad-rays", type=int, default=2**18)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backends", nargs="*", default=["torch", "cuda"])
    ap.add_argument("--weights-grad", action="store_true", help="also compute the NeRF weights' gradients")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="print torch.profiler tables (ROWS rows) of each backend's pose-gradient step")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    base, _ = load_checkpoint(args.checkpoint, device="cuda")
    intr = Intrinsics.from_fov(args.size, args.size, math.radians(args.fov))
    az = torch.linspace(0, 2 * math.pi, args.poses + 1, device="cuda")[:-1]
    el = torch.full_like(az, math.radians(20.0))
    centre = torch.tensor(base.normalization.centre, device="cuda")
    dist = torch.full_like(az, args.radius)
    poses = pose_from_spherical(az, el, dist, centre)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_per = args.grad_rays // args.poses
    uv = torch.rand(args.poses, n_per, 2, device="cuda", generator=gen) * args.size
    w = torch.rand(args.poses, n_per, 3, device="cuda", generator=gen)

    results, frames = {}, {}
    for name in args.backends:
        model = _as_backend(base, name, args.weights_grad)
        t_frame, out = _timed(lambda: render(model, poses, intr, background="white"), args.repeat)
        frames[name] = out["rgb"].clamp(0, 1)

        def grad_step():
            a = az.clone().requires_grad_(True)
            res = render(model, pose_from_spherical(a, el, dist, centre), intr, uv=uv, background="white", requires_grad=True)
            ((res["rgb"] * w).sum() + res["opacity"].sum()).backward()
            return a.grad

        t_grad, g = _timed(grad_step, args.repeat)
        if args.profile:
            _profile(grad_step, name, args.profile)
        results[name] = {
            "frames_per_s": args.poses / t_frame,
            "s_per_frame": t_frame / args.poses,
            "pose_grad_rays_per_s": args.grad_rays / t_grad,
            "pose_grad_s": t_grad,
            "pose_grad": [float(x) for x in g],
            "mean_opacity": float(out["opacity"].mean()),
        }
        print(f"[render] {name}: {results[name]['frames_per_s']:.2f} frames/s at {args.size} px, pose gradient "
              f"{results[name]['pose_grad_rays_per_s'] / 1e6:.2f} M rays/s", flush=True)
    report = {
        "benchmark": "render",
        "device_name": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "checkpoint": str(args.checkpoint),
        "config": base.cfg.to_dict(),
        "image_size": args.size,
        "poses": args.poses,
        "grad_rays": args.grad_rays,
        "weights_grad": args.weights_grad,
        "repeat": args.repeat,
        "backends": results,
    }
    if "torch" in frames and "cuda" in frames:
        mse = float(((frames["cuda"] - frames["torch"]) ** 2).mean())
        report["psnr_cuda_vs_torch"] = -10 * math.log10(max(mse, 1e-12))
        report["speedup"] = {
            "frames_per_s": results["cuda"]["frames_per_s"] / results["torch"]["frames_per_s"],
            "pose_grad_rays_per_s": results["cuda"]["pose_grad_rays_per_s"] / results["torch"]["pose_grad_rays_per_s"],
        }
        print(f"[render] cuda vs torch: frames PSNR {report['psnr_cuda_vs_torch']:.1f} dB, speed-up "
              f"{report['speedup']}", flush=True)
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
