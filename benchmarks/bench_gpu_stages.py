"""Time the GPU stages validate_checkpoint and train_detector at the configs/gpu.yaml size, and their parts.

Each stage runs as Snakemake runs it: its workflow script in a fresh Python process (imports, CUDA start,
kernel load included), with a stand-in for the ``snakemake`` object. ``--old-tree DIR`` also runs the
validate_checkpoint script of another checkout (the code before a change) on the same checkpoint, for a
same-call comparison.

What it sets up first (not timed as a stage): one procedural class (fist) at gpu.yaml's 800x800 with
``--train-views`` training views and 10 test views, ray-traced on the GPU, and a NeRF of the paper preset
trained for ``--nerf-steps`` steps (the first use builds the CUDA kernels; that time is reported apart).
validate_checkpoint gets ``min_psnr = min_mask_iou = 0`` so that this short-trained NeRF passes and the
stage does all its work (the PNG of a failed check is never written). train_detector trains on three
"classes" that are all this NeRF (gpu.yaml's 600 images per class, so the 1800 renders and 336 steps of the
real stage).

    python benchmarks/bench_gpu_stages.py --work /tmp/gs --out benchmarks/results/gpu_stages.json [--old-tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Runs a workflow script with a stand-in snakemake object read from a json file (argv: tree, script, json).
RUNNER = r"""
import json, runpy, sys
tree, script, spec = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
sys.path.insert(0, tree)

class NS(dict):
    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k)

def ns(d):
    return NS({k: (ns(v) if isinstance(v, dict) and k not in ("source", "pose_space", "target", "detector") else v)
               for k, v in d.items()})

sm = NS(input=ns(spec["input"]), output=ns(spec["output"]), params=ns(spec["params"]), log=[spec["log"]],
        wildcards=NS(spec["wildcards"]), threads=spec["threads"], resources=NS(spec["resources"]), rule=spec["rule"])
runpy.run_path(script, init_globals={"snakemake": sm}, run_name="__main__")
"""

STARTUP = r"""
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import torch
t1 = time.perf_counter()
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
t2 = time.perf_counter()
from instsim.backend import load_kernels
load_kernels(0)
t3 = time.perf_counter()
print({"import_torch_s": t1 - t0, "cuda_start_s": t2 - t1, "load_cached_kernels_s": t3 - t2})
"""


def _run_stage(tree: Path, rule: str, spec: dict, work: Path) -> dict:
    spec_path = work / f"{rule}_{tree.name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(tree), "INSTSIM_GPU_LOCK_DIR": str(work / "locks")}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the stage claims its GPU, as in a run
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tree), str(tree / "workflow" / "scripts" / f"{rule}.py"),
                           str(spec_path)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    log_text = Path(spec["log"]).read_text() if Path(spec["log"]).exists() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{rule} ({tree}) failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "log": log_text.splitlines()[-40:]}


def _log_seconds(lines: list[str], pattern: str) -> float | None:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return float(m.group(1))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--old-tree", help="another checkout whose validate_checkpoint script is timed too")
    ap.add_argument("--train-views", type=int, default=40)
    ap.add_argument("--nerf-steps", type=int, default=400)
    ap.add_argument("--old-loop-steps", type=int, default=60, help="detector steps timed with batches built in the loop")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (use small sizes)")
    ap.add_argument("--size", type=int, help="NeRF image size (default: gpu.yaml's); for smoke tests")
    ap.add_argument("--det-images", type=int, help="detector images per class (default: gpu.yaml's); for smoke tests")
    ap.add_argument("--only", choices=["validate", "detector"], help="time one stage only (setup reused if present)")
    args = ap.parse_args()
    import torch
    import yaml

    from instsim.io import write_json
    from instsim.nerf.train import train_nerf
    from instsim.stages.config import nerf_config
    from instsim.stages.dataset import generate_procedural
    from instsim.stages.intrinsics import extract_intrinsics
    from instsim.transforms import load_views

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((REPO / "configs" / "gpu.yaml").read_text())
    dev = args.device
    if args.size:
        cfg["dataset"]["image_size"] = args.size
    if args.det_images:
        cfg["detector"]["images_per_class"] = args.det_images
    gpu = dev == "cuda"
    result: dict = {"benchmark": "gpu_stages", "device_name": torch.cuda.get_device_name(0) if gpu else "cpu",
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda, "python": platform.python_version(), "config": "configs/gpu.yaml",
                    "setup": {"train_views": args.train_views, "test_views": 10, "nerf_steps": args.nerf_steps,
                              "image_size": cfg["dataset"]["image_size"],
                              "detector_images_per_class": cfg["detector"]["images_per_class"]}}

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    data = work / "data" / "fist"
    ds = dict(cfg["dataset"], views={"train": args.train_views, "val": 1, "test": 10})
    reuse = args.only is not None and (work / "nerf" / "fist" / "checkpoint.pt").exists()
    t = time.perf_counter()
    if not reuse:
        generate_procedural("fist", data, ds, seed=0, progress=False, device=dev)
    info = extract_intrinsics(data / "transforms_train.json")
    write_json(data / "intrinsics.json", info)
    result["setup"]["dataset_s"] = round(time.perf_counter() - t, 2)
    ncfg = nerf_config("paper" if gpu else "cpu", {"steps": args.nerf_steps, "backend": "cuda" if gpu else "torch",
                                                  "checkpoint_every": 100000}, device=dev, seed=0)
    ckpt = work / "nerf" / "fist" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if not reuse:
        summary = train_nerf(load_views(data / "transforms_train.json"), info, ncfg, ckpt, ckpt.with_name("log.tsv"),
                             progress=False)
        result["setup"]["nerf_s_incl_kernel_build"] = round(time.perf_counter() - t, 2)
        result["setup"]["nerf_train_s"] = round(summary["train_time_s"], 2)
        result["setup"]["nerf_backend"] = summary["backend"]
    save()

    if gpu:
        probe = subprocess.run([sys.executable, "-c", STARTUP, str(REPO)], capture_output=True, text=True, check=True)
        result["job_startup"] = {k: round(v, 2) for k, v in eval(probe.stdout.strip().splitlines()[-1]).items()}
        save()

    trees = {"new": REPO}
    if args.old_tree:
        trees = {"old": Path(args.old_tree), "new": REPO}
    result["validate_checkpoint"] = {}
    for name, tree in trees.items() if args.only != "detector" else ():
        out = work / f"val_{name}"
        spec = {
            "rule": "validate_checkpoint", "threads": 1, "resources": {"gpu": 1, "mem_mb": 4000},
            "wildcards": {"cls": "fist"}, "log": str(out / "log.txt"),
            "input": {"checkpoint": str(ckpt), "transforms": str(data / "transforms_test.json"),
                      "intrinsics": str(data / "intrinsics.json")},
            "output": {"metrics": str(out / "validation.json"), "comparison": str(out / "validation.png")},
            "params": {"min_psnr": 0.0, "min_mask_iou": 0.0, "background": "white", "device": dev,
                       "source": {"source": "procedural", "gesture": "fist"}, "seed": 0},
        }
        out.mkdir(parents=True, exist_ok=True)
        r = _run_stage(tree, "validate_checkpoint", spec, work)
        metrics = json.loads((out / "validation.json").read_text())
        r.update(psnr=round(metrics["psnr"], 4), ssim=round(metrics["ssim"], 6),
                 convention_min_iou=metrics.get("convention_check", {}).get("min_iou"),
                 png_mb=round((out / "validation.png").stat().st_size / 1e6, 2),
                 stage_s_in_log=_log_seconds(r["log"], r"validate_checkpoint: done in ([0-9.]+) s"))
        result["validate_checkpoint"][name] = r
        save()

    if args.only == "validate":
        return
    det = cfg["detector"]
    out = work / "det"
    out.mkdir(parents=True, exist_ok=True)
    classes = ["fist", "palm", "yeah"]
    spec = {
        "rule": "train_detector", "threads": 2, "resources": {"gpu": 1, "mem_mb": 4000},
        "wildcards": {"strategy": "uniform", "seed": "0"}, "log": str(out / "log.txt"),
        "input": {"checkpoints": [str(ckpt)] * 3, "validations": [], "intrinsics": [str(data / "intrinsics.json")] * 3},
        "output": {"model": str(out / "model.pt"), "train_log": str(out / "train_log.tsv"),
                   "samples": str(out / "train_samples.png")},
        "params": {"classes": classes, "pose_space": cfg["pose_space"], "target": cfg["target"], "detector": det,
                   "device": dev, "run_seed": 0, "resume": str(out / "resume" / "state.pt")},
    }
    r = _run_stage(REPO, "train_detector", spec, work)
    r["training_s_in_log"] = _log_seconds(r["log"], r"detector training reached step \d+/\d+ in ([0-9.]+) s")
    r["stage_s_in_log"] = _log_seconds(r["log"], r"train_detector: done in ([0-9.]+) s")
    result["train_detector"] = {"new": r}
    save()

    # the training loop alone, batches built in the loop (before) vs ahead in threads (now), same batches
    from instsim.detect import train_detector
    from instsim.stages.strategies import detector_config

    dcfg = detector_config(det["settings"], cfg["target"]["image_size"], 3, 0)
    n = 3 * int(det["images_per_class"])
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, dcfg.image_size, dcfg.image_size, generator=gen) * 255).to(torch.uint8)
    boxes = [torch.tensor([[30.0 + i % 20, 30.0, 40.0, 50.0]]) for i in range(n)]
    labels = [torch.tensor([i % 3]) for i in range(n)]
    loop = {}
    torch.set_num_threads(2)
    for prefetch in (False, True):
        train_detector(images, boxes, labels, dcfg, max_steps=5, progress=False, device=dev, prefetch=prefetch)
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        sync()
        t = time.perf_counter()
        train_detector(images, boxes, labels, dcfg, max_steps=args.old_loop_steps, progress=False, device=dev,
                       prefetch=prefetch)
        sync()
        loop["prefetch" if prefetch else "in_loop"] = round((time.perf_counter() - t) / args.old_loop_steps, 4)
    loop["steps_per_run"] = dcfg.total_steps(n)
    loop["note"] = "seconds per step over the first steps of a run (model build included), 2 torch threads"
    result["detector_loop_s_per_step"] = loop
    if gpu:
        result["peak_gpu_memory_mb_this_process"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    save()
    print(json.dumps({k: v for k, v in result.items() if k != "validate_checkpoint"}, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
