"""Benchmark NeRF training: test PSNR (composited on white) against training time, per class.

Default: the three procedural hand gestures of ``instsim.scene``, rendered in memory like the
``generate_dataset`` stage (camera on sphere, config.yaml's fov/radius/supersample), ``--size`` px,
``--views`` training views, 10 test views; trained with the CPU preset (``NerfConfig.cpu()``).
``--data DIR [DIR ...]`` uses BlenderNeRF folders instead (``transforms_train.json`` + ``transforms_test.json``).

Examples::

    python benchmarks/bench_nerf_train.py                          # CPU default, 96 px, 100 views
    python benchmarks/bench_nerf_train.py --data tests/data/blendernerf_tiny
    python benchmarks/bench_nerf_train.py --device cuda --preset paper --size 800 --views 100 --set steps=5000

Writes ``benchmarks/results/nerf_train_<device>.json`` (``--out`` overrides): device, torch version, CPU
count, threads, config, and per class the PSNR-vs-time curve, time to 33 dB, final test PSNR/SSIM.
Test-view evaluation during training is excluded from the training time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instsim.cameras import Intrinsics, sample_sphere_poses  # noqa: E402
from instsim.stages.intrinsics import extract_intrinsics  # noqa: E402
from instsim.io import write_json  # noqa: E402
from instsim.nerf.config import NerfConfig  # noqa: E402
from instsim.nerf.metrics import composite_rgba, psnr  # noqa: E402
from instsim.nerf.rendering import render  # noqa: E402
from instsim.nerf.train import train_nerf  # noqa: E402
from instsim.nerf.validate import validate_checkpoint  # noqa: E402
from instsim.scene import make_hand, render_scene  # noqa: E402
from instsim.seeds import class_seed  # noqa: E402
from instsim.transforms import Frame, Transforms, Views, load_views  # noqa: E402

TARGET_PSNR = 33.0


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def procedural_views(
    gesture: str, size: int, n_train: int, n_test: int, device: str, seed: int = 0, supersample: int | None = None
):
    """Train/test :class:`Views` and a :class:`Transforms` of a hand gesture, rendered like ``generate_dataset``."""
    ds = yaml.safe_load((REPO / "config.yaml").read_text())["dataset"]
    intr = Intrinsics.from_fov(size, size, math.radians(float(ds["fov_deg"])))
    scene = make_hand(gesture).to(device)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        gen = torch.Generator().manual_seed(class_seed(seed, gesture, split))
        poses = sample_sphere_poses(n, float(ds["radius"]), gen, upper_hemisphere=bool(ds["upper_hemisphere"]))
        imgs = []
        for s in range(0, n, 8):
            imgs.append(render_scene(scene, poses[s : s + 8].to(device), intr, supersample=int(supersample or ds["supersample"])).cpu())
        images = torch.cat(imgs)
        names = [f"{split}/{i + 1:04d}.png" for i in range(n)]
        out[split] = Views(images, poses, intr, names)
    frames = [Frame(nm, Path(nm), p.double().numpy()) for nm, p in zip(out["train"].file_paths, out["train"].poses)]
    tf = Transforms(Path(f"<memory:{gesture}>"), intr, frames)
    return out["train"], out["test"], tf


def folder_views(path: Path):
    train = load_views(path / "transforms_train.json")
    test_json = path / "transforms_test.json"
    if not test_json.is_file():
        test_json = path / "transforms_val.json"
    return train, load_views(test_json), path / "transforms_train.json"


@torch.no_grad()
def test_psnr(model, views: Views, device: torch.device, max_views: int | None = None) -> float:
    vals = []
    n = len(views.poses) if max_views is None else min(max_views, len(views.poses))
    for i in range(n):
        out = render(model, views.poses[i].to(device), views.intrinsics, background="white")
        vals.append(psnr(out["rgb"].clamp(0, 1).cpu(), composite_rgba(views.images[i], (1.0, 1.0, 1.0))))
    return float(np.mean(vals))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", type=Path, help="BlenderNeRF folders (default: procedural hands)")
    ap.add_argument("--gestures", nargs="*", default=["fist", "yeah", "palm"])
    ap.add_argument("--size", type=int, default=96, help="procedural image size in px")
    ap.add_argument("--views", type=int, default=100, help="procedural training views")
    ap.add_argument("--test-views", type=int, default=10)
    ap.add_argument("--supersample", type=int, default=None, help="procedural anti-aliasing (default: config.yaml's)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--preset", choices=["cpu", "paper"], default=None, help="default: cpu on CPU, paper on CUDA")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="NerfConfig overrides")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between test evaluations (0: log_every)")
    ap.add_argument("--eval-views", type=int, default=None, help="test views in the curve (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default=None, help="free text stored in the report (e.g. how the CPU was pinned)")
    ap.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    args = ap.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("paper" if device.type == "cuda" else "cpu")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: _parse_value(v) for k, v in overrides.items()}
    overrides["device"] = str(device)
    if args.eval_every:
        overrides.setdefault("log_every", args.eval_every)
    cfg = (NerfConfig.cpu if preset == "cpu" else NerfConfig.paper)(**overrides)

    if args.data:
        datasets = [(p.name, *folder_views(p)) for p in args.data]
    else:
        datasets = []
        for g in args.gestures:
            t0 = time.perf_counter()
            tr, te, tf = procedural_views(g, args.size, args.views, args.test_views, str(device), supersample=args.supersample)
            print(f"[bench] rendered {g}: {args.views}+{args.test_views} views at {args.size} px in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            datasets.append((g, tr, te, tf))

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_nerf_"))
    results = {}
    for name, train, test, tf in datasets:
        info = extract_intrinsics(tf)
        curve = []

        def on_log(step, model, _test=test):
            curve.append({"step": step, "test_psnr": test_psnr(model, _test, device, args.eval_views)})

        ckpt = workdir / name / "nerf.pt"
        for stale in (ckpt, workdir / name / "train_log.tsv"):
            stale.unlink(missing_ok=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        summary = train_nerf(train, info, cfg, ckpt, workdir / name / "train_log.tsv", progress=False, on_log=on_log)
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        # attach training time to the curve from the log (the log's elapsed excludes evaluation)
        log_rows = (workdir / name / "train_log.tsv").read_text().splitlines()
        header = log_rows[0].split("\t")
        rows = [dict(zip(header, r.split("\t"))) for r in log_rows[1:]]
        by_step = {int(r["step"]): r for r in rows}
        for point in curve:
            r = by_step.get(point["step"], {})
            point["train_time_s"] = float(r.get("elapsed_s", "nan"))
            point["train_psnr"] = float(r.get("psnr", "nan"))
            point["samples_per_ray"] = float(r.get("samples_per_ray", "nan"))
            point["occupied_fraction"] = float(r.get("occupied_fraction", "nan"))
        reach = next((p for p in curve if p["test_psnr"] >= TARGET_PSNR), None)
        reach_at = {
            str(level): next((p["train_time_s"] for p in curve if p["test_psnr"] >= level), None)
            for level in (30.0, 33.0, 35.0, 38.0, 38.8)
        }
        t0 = time.perf_counter()
        val = validate_checkpoint(ckpt, test, background="white", min_psnr=TARGET_PSNR, device=device)
        render_s = (time.perf_counter() - t0) / max(1, len(test.poses))
        results[name] = {
            "train_time_s": summary["train_time_s"],
            "steps": summary["step"],
            "test_psnr_white": val["psnr"],
            "test_ssim_white": val["ssim"],
            "test_mask_iou": val["mask_iou"],
            "passed_33db": val["passed"],
            "time_to_33db_s": reach["train_time_s"] if reach else None,
            "steps_to_33db": reach["step"] if reach else None,
            "time_to_psnr_s": reach_at,
            "rays_per_s": summary["rays_per_s"],
            "iterations_per_s": summary["steps_run"] / max(summary["train_time_s"], 1e-9),
            "peak_gpu_memory_gb": peak_gb,
            "cuda_graph_captures": summary.get("cuda_graph_captures"),
            "best_test_psnr_in_curve": max((p["test_psnr"] for p in curve), default=None),
            "samples_per_ray": summary["samples_per_ray"],
            "occupied_fraction": summary["occupied_fraction"],
            "render_s_per_view": render_s,
            "image_size": [train.intrinsics.w, train.intrinsics.h],
            "train_views": len(train.poses),
            "test_views": len(test.poses),
            "max_res": summary["config"]["max_res"],
            "curve": curve,
        }
        print(f"[bench] {name}: {summary['train_time_s']:.1f} s, {summary['step']} steps, test PSNR "
              f"{val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}, 33 dB after "
              f"{results[name]['time_to_33db_s']} s", flush=True)

    report = {
        "benchmark": "nerf_train",
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
        "preset": preset,
        "backend": cfg.backend if device.type == "cuda" else "torch",
        "config": cfg.to_dict(),
        "data": [str(p) for p in args.data] if args.data else {"procedural": args.gestures, "size": args.size, "views": args.views},
        "target_psnr_white": TARGET_PSNR,
        "classes": results,
        "all_passed": all(r["passed_33db"] for r in results.values()),
        "max_train_time_s": max(r["train_time_s"] for r in results.values()) if results else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": args.note,
    }
    out = args.out or REPO / "benchmarks" / "results" / f"nerf_train_{device.type}.json"
    write_json(out, report)
    print(f"[bench] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
