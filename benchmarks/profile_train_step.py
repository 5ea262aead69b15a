"""Profile NeRF training steps on a GPU (torch.profiler): where a step's time goes, per backend.

Renders one procedural hand like ``bench_nerf_train.py``, trains ``--warm`` steps (so the occupancy grid has
pruned), then profiles ``--steps`` more and prints the operators with the most GPU time and the most CPU
time, plus the wall time per step. For finding the next thing to speed up, not for reported numbers
(``bench_nerf_train.py`` is the benchmark).

    python benchmarks/profile_train_step.py --backend cuda --size 800
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_nerf_train import folder_views, procedural_views  # noqa: E402

from instsim.stages.intrinsics import extract_intrinsics  # noqa: E402
from instsim.nerf.config import NerfConfig  # noqa: E402
from instsim.nerf.train import train_nerf  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--rays", type=int, default=0, help="fixed rays per step, as torch-ngp (0: the preset's sample budget)")
    ap.add_argument("--data", type=Path, default=None, help="a BlenderNeRF folder instead of the procedural fist")
    args = ap.parse_args(argv)

    if args.data:
        train, _test, tf = folder_views(args.data)
    else:
        train, _test, tf = procedural_views("fist", args.size, 100, 1, "cuda")
    info = extract_intrinsics(tf)
    work = Path(tempfile.mkdtemp(prefix="profile_nerf_"))
    total = args.warm + args.steps
    cfg = NerfConfig.paper(device="cuda", backend=args.backend, steps=total, log_every=10**6, checkpoint_every=10**6)
    if args.rays:
        cfg = cfg.replace(batch_rays=args.rays, batch_samples=0)
    train_nerf(train, info, cfg, work / "nerf.pt", work / "log.tsv", progress=False, max_steps=args.warm)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        train_nerf(train, info, cfg, work / "nerf.pt", work / "log.tsv", progress=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    graphs = os.environ.get("INSTSIM_CUDA_GRAPHS", "1")
    print(f"[profile] {args.backend}, rays per step {args.rays or 'adaptive'}, INSTSIM_CUDA_GRAPHS={graphs}: {args.steps} "
          f"steps in {wall:.3f} s ({1000 * wall / args.steps:.2f} ms/step, including the resume from the checkpoint "
          "and, with graphs, one capture)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
