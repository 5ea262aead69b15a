"""Benchmark: seconds per Neural-Sim outer iteration (and per control iteration, psi frozen) at the config's sizes,
on the NeRFs and target/val of a finished workflow run.

Needs ``<results>/nerf/{cls}/checkpoint.pt``, ``<results>/data/{cls}/intrinsics.json`` and ``<results>/target/val``
(e.g. after ``snakemake --cores all results/target/val/annotations.json`` plus the NeRF stages). Writes
``benchmarks/results/neuralsim.json``: device, torch version, cpu count, torch threads, load average (the machine
may be shared), the Neural-Sim and detector settings, seconds per iteration (each, median) and the part spent on the
hypergradient (HVPs, image gradients, re-render with gradient), and the val loss / TV trajectories.

    python benchmarks/bench_neuralsim.py [--results results] [--config config.yaml] [--iterations 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instsim.poses import PoseSpace  # noqa: E402
from instsim.stages.config import resolve_device  # noqa: E402
from instsim.io import read_json  # noqa: E402
from instsim.neuralsim.config import NeuralSimConfig  # noqa: E402
from instsim.neuralsim.loop import optimize_distribution  # noqa: E402
from instsim.neuralsim.objective import ValSet  # noqa: E402
from instsim.neuralsim.samples import ClassRenderers  # noqa: E402
from instsim.neuralsim.step import BilevelProblem  # noqa: E402
from instsim.synthesis import DetectionCamera  # noqa: E402
from instsim.stages.strategies import detector_config, load_class_nerfs, load_coco_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=REPO / "results", help="results folder of a workflow run")
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml", help="sizes (target, detector, neuralsim)")
    ap.add_argument("--iterations", type=int, default=3, help="outer iterations timed per run")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a loaded 2-core box)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "neuralsim.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(args.config.read_text())
    classes = list(cfg["classes"])
    device = resolve_device(args.device)
    space = PoseSpace.from_config(cfg["pose_space"])
    ns = NeuralSimConfig.from_dict({**cfg.get("neuralsim", {}), "iterations": args.iterations, "eval_every": args.iterations})
    det = detector_config(cfg["detector"]["settings"], cfg["target"]["image_size"], len(classes), cfg["seed"])
    r = args.results
    models, centres, radii = load_class_nerfs({c: r / f"nerf/{c}/checkpoint.pt" for c in classes},
                                       {c: r / f"data/{c}/intrinsics.json" for c in classes}, device)
    coco, images, boxes, labels = load_coco_images(r / "target/val/annotations.json", r / "target/val/images")
    target = read_json(r / "target/val/distribution.json")["probabilities"]
    problem = BilevelProblem(ClassRenderers(models, centres, DetectionCamera.from_target_config(cfg["target"]), radii), space,
                             ValSet(images, boxes, labels, coco), det, target, device)

    runs = {}
    load_before = os.getloadavg()
    for name, update in (("neuralsim", True), ("control", False)):
        t0 = time.perf_counter()
        _, _, rows = optimize_distribution(problem, ns, seed=ns.seed, update_psi=update, progress=sys.stderr.isatty(),
                                           log_fn=lambda m: None)
        steps = rows[1:]
        runs[name] = {
            "total_seconds": round(time.perf_counter() - t0, 2),
            "seconds_per_iteration": [round(x["seconds"], 3) for x in steps],
            "median_seconds_per_iteration": round(statistics.median(x["seconds"] for x in steps), 3),
            "median_hypergrad_seconds": round(statistics.median(x["hypergrad_seconds"] for x in steps), 3),
            "val_loss": [round(x["val_loss"], 4) for x in rows],
            "tv_to_target": [round(x["tv_to_target"], 4) for x in rows],
        }
        print(name, runs[name], flush=True)
    load_after = os.getloadavg()
    result = {
        "benchmark": "neuralsim",
        "device": str(device),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "neuralsim": ns.to_dict(),
        "detector": det.to_dict(),
        "image_size": cfg["target"]["image_size"],
        "classes": classes,
        "val_images": len(images),
        "nerfs": str(r),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
