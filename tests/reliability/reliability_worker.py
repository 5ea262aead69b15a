"""A training job that ``test_faults.py`` runs as a real process and kills with SIGKILL, then runs again.

Usage: ``python reliability_worker.py JOB WORKDIR [ARG]`` with JOB one of

* ``nerf``: the real ``train_nerf`` stage script (fake ``snakemake`` object) on the BlenderNeRF fixture, under
  ``WORKDIR/results`` (settings :data:`NERF`); periodic state in ``results/nerf/shapes/resume/``;
* ``detector``: :func:`instsim.detect.train_detector` on a synthetic shapes set (settings :data:`DETECTOR`),
  checkpoint ``WORKDIR/state.pt``, final ``WORKDIR/model.pt``; prints ``step N`` after each step;
* ``neuralsim``: :func:`instsim.neuralsim.loop.optimize_distribution` on the stand-in disk problem of
  ``tests/test_neuralsim_loop.py`` (settings :data:`NEURALSIM`), checkpoint ``WORKDIR/state.pt``, final
  ``WORKDIR/psi.pt``; prints ``iteration N`` lines;
* ``atomic WRITER``: writes ``WORKDIR/out.*`` once with WRITER (``json``, ``png``, ``torch``), then again with
  ``os.replace`` made to SIGKILL the process: a kill between writing and renaming.

The detector and Neural-Sim jobs pace themselves (a short sleep per step) so that the test can kill them
mid-run on a fast machine too; the sleep changes nothing they compute.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from instsim.detect import DetectorConfig, make_shapes_dataset, save_detector, train_detector  # noqa: E402
from instsim.io import save_torch, write_json, write_png  # noqa: E402
from instsim.neuralsim.config import NeuralSimConfig  # noqa: E402
from instsim.neuralsim.loop import optimize_distribution  # noqa: E402
from reliability_cases import train_nerf_job  # noqa: E402
from reliability_stage import run_stage_script  # noqa: E402
from test_neuralsim_loop import disk_bilevel, make_disk_problem  # noqa: E402

torch.set_num_threads(1)  # two shared cores; one thread also keeps the runs bit-for-bit comparable

#: NeRF overrides: 120 steps (~7 s on one CPU thread), a checkpoint every 20
NERF = {"steps": 120, "checkpoint_every": 20, "log_every": 5}
#: the detector: 120 steps, a checkpoint every 10
DETECTOR = dict(image_size=32, num_classes=3, width=4, head_width=4, dilations=(1,), batch_size=8, steps=120,
                warmup_steps=5, checkpoint_every=10, seed=3)
#: Neural-Sim: 8 iterations, a checkpoint every 2
NEURALSIM = {"iterations": 8, "images_per_class": 8, "inner_steps": 2, "inner_lr": 1e-3, "learned": ["elevation"],
             "pretrain_steps": 0, "psi_lr": 0.1, "eval_every": 4, "checkpoint_every": 2, "seed": 0,
             "temperature": 0.5, "relaxation": "soft", "reset_detector": False,
             "estimator": "pathwise"}
PACE_S = 0.02


def shapes_data():
    return make_shapes_dataset(64, image_size=32, min_size=6, max_size=14, seed=7)


def run_nerf(workdir: Path) -> int:
    return run_stage_script("train_nerf", train_nerf_job(workdir, **NERF)).exit_code


def run_detector(workdir: Path) -> int:
    images, boxes, labels = shapes_data()
    history: list = []

    def say(msg: str) -> None:
        print(msg, flush=True)
        time.sleep(PACE_S)

    model = train_detector(images, boxes, labels, DetectorConfig(**DETECTOR), log=say, log_every=1,
                           checkpoint_path=workdir / "state.pt", progress=False, history=history)
    save_detector(model, workdir / "model.pt")
    return 0


def run_neuralsim(workdir: Path, checkpoint: bool = True):
    def say(msg: str) -> None:
        print(msg, flush=True)
        time.sleep(PACE_S)

    dist, _, rows = optimize_distribution(
        disk_bilevel(make_disk_problem()), NeuralSimConfig.from_dict(NEURALSIM),
        checkpoint_path=workdir / "state.pt" if checkpoint else None, progress=False, log_fn=say,
    )
    save_torch({"psi": dist.state_dict(), "rows": rows}, workdir / "psi.pt")
    return 0


def run_atomic(workdir: Path, writer: str) -> int:
    write = {
        "json": lambda value: write_json(workdir / "out.json", {"value": value}),
        "png": lambda value: write_png(workdir / "out.png", np.full((8, 8, 3), value / 10, np.float32)),
        "torch": lambda value: save_torch({"value": torch.full((1000,), float(value))}, workdir / "out.pt"),
    }[writer]
    write(1)

    def killed_before_rename(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = killed_before_rename  # the next write dies after writing its temporary file
    write(2)
    return 3  # not reached


def main(argv: list[str]) -> int:
    job, workdir = argv[0], Path(argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    if job == "nerf":
        return run_nerf(workdir)
    if job == "detector":
        return run_detector(workdir)
    if job == "neuralsim":
        return run_neuralsim(workdir)
    if job == "atomic":
        return run_atomic(workdir, argv[2])
    raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
