"""Benchmark: train the detector with the default DetectorConfig on a synthetic 64x64 shapes set (600
train images) and evaluate it on 200 held-out images of the same distribution.

Writes ``benchmarks/results/detect_train.json``: device, torch version, cpu count, torch threads, load
average (the machine may be shared), config, training seconds, seconds per step, and COCO metrics.

    python benchmarks/bench_detect_train.py [--n-train 600] [--n-test 200] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instsim.detect import SHAPE_NAMES, DetectorConfig, evaluate_coco, make_coco_gt, make_shapes_dataset, predict, train_detector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="data seed")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "detect_train.json")
    args = ap.parse_args()

    cfg = DetectorConfig()
    images, boxes, labels = make_shapes_dataset(args.n_train + args.n_test, image_size=cfg.image_size, seed=args.seed)
    n = args.n_train
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model = train_detector(images[:n], boxes[:n], labels[:n], cfg, progress=sys.stderr.isatty())
    train_s = time.perf_counter() - t0
    load_after = os.getloadavg()
    steps = cfg.total_steps(n)
    t0 = time.perf_counter()
    dets = predict(model, images[n:])
    predict_s = time.perf_counter() - t0
    metrics = evaluate_coco(make_coco_gt(boxes[n:], labels[n:], cfg.image_size, SHAPE_NAMES), dets)
    result = {
        "benchmark": "detect_train",
        "device": "cpu",
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "config": cfg.to_dict(),
        "n_train": n,
        "n_test": args.n_test,
        "steps": steps,
        "train_seconds": round(train_s, 2),
        "seconds_per_step": round(train_s / steps, 4),
        "predict_seconds": round(predict_s, 3),
        "AP": round(metrics["AP"], 4),
        "AP50": round(metrics["AP50"], 4),
        "AP75": round(metrics["AP75"], 4),
        "per_class_AP": {k: (None if v["AP"] is None else round(v["AP"], 4)) for k, v in metrics["per_class"].items()},
        "target": "train_seconds <= 60 on a 2-core CPU, AP50 >= 0.8",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
