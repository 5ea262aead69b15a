"""CPU stages under load: NeRF and detector training steps on an idle CPU and beside one competing busy
process, with the old thread policy (the rule's 2 threads, fixed) against instsim.threads.ThreadGovernor.

Run it pinned to two cores, like the 2-core machine the default run is sized for (the competing process
inherits the pinning, so it takes one of the two cores)::

    taskset -c 0,1 python benchmarks/bench_cpu_contention.py --out benchmarks/results/cpu_contention.json

Policies, each in a fresh process (OpenMP reads ``OMP_WAIT_POLICY`` when torch loads):

* ``old``: ``torch.set_num_threads(2)``, what the scripts did with the rule's ``threads: 2``;
* ``old_passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead of spinning at barriers);
* ``one``: 1 thread;
* ``new``: :class:`instsim.threads.ThreadGovernor` with ``max_threads=2``, as ``run_stage`` enters it.

Loads: ``idle``; ``busy`` (one ``while True: pass`` process started before the work); ``late`` (``new``
only: the busy process starts ``--late-s`` seconds into the work, so the governor must notice it).

Workloads, stage-sized: ``nerf`` = ``train_nerf`` steps of the CPU preset on a procedural class at the
default config's size (96 px, 100 views; generated before timing), ``detector`` = ``train_detector`` steps
at the default config's detector size (64 px images, batch 32). Each run does at most ``--steps`` steps or
stops after ``--budget-s`` seconds of work (but not before 4 steps), whichever comes first, and reports seconds per step (the
first step of a run left out; one untimed warm-up run per process first).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POLICIES = ("old", "old_passive", "one", "new")
BUSY = "while True: pass"
#: a run goes on past its time budget until this many steps are done (the first is not timed)
MIN_STEPS = 4
_RUNS = itertools.count()


class _Stop(Exception):
    """Raised from a progress callback to end a timed run."""


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUSY])


def _nerf_setup(data: Path):
    from instsim.io import read_json
    from instsim.stages.config import nerf_config
    from instsim.transforms import load_views

    views = load_views(data / "transforms_train.json")
    info = read_json(data / "intrinsics.json")
    cfg = nerf_config("cpu", {"log_every": 1, "checkpoint_every": 100000}, device="cpu", seed=0)
    return views, info, cfg


def _run_nerf(setup, steps: int, budget_s: float, tmp: Path) -> tuple[int, float]:
    from instsim.nerf.train import train_nerf

    views, info, cfg = setup
    times: list[float] = []

    def on_log(step, model):
        times.append(time.perf_counter())
        if times[-1] - t0 > budget_s and len(times) >= MIN_STEPS:
            raise _Stop

    t0 = time.perf_counter()
    run = next(_RUNS)  # a fresh checkpoint path: an existing one would be resumed from
    try:
        train_nerf(views, info, cfg, tmp / f"n{run}.pt", tmp / f"n{run}.tsv", progress=False, max_steps=steps,
                   on_log=on_log)
    except _Stop:
        pass
    return _per_step(times)


def _per_step(times: list[float]) -> tuple[int, float]:
    """Steps timed and their seconds, from the first step's end to the last's (the first step also builds
    things once: it is left out)."""
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} step(s) finished inside the budget: raise --budget-s")
    return len(times) - 1, times[-1] - times[0]


def _det_setup():
    import torch

    from instsim.detect import DetectorConfig

    cfg = DetectorConfig.from_dict({"image_size": 64, "num_classes": 3, "seed": 0, "epochs": 15}, source="bench")
    gen = torch.Generator().manual_seed(0)
    n = 600  # the default run's 200 images per class x 3 classes
    images = (torch.rand(n, 3, 64, 64, generator=gen) * 255).to(torch.uint8)
    xy = torch.rand(n, 2, generator=gen) * 30 + 4
    boxes = [torch.cat([xy[i], torch.tensor([24.0, 28.0])])[None] for i in range(n)]
    labels = [torch.tensor([i % 3]) for i in range(n)]
    return images, boxes, labels, cfg


def _run_det(setup, steps: int, budget_s: float) -> tuple[int, float]:
    from instsim.detect import train_detector

    images, boxes, labels, cfg = setup
    times: list[float] = []

    def say(msg):
        if msg.startswith("step "):
            times.append(time.perf_counter())
            if times[-1] - t0 > budget_s and len(times) >= MIN_STEPS:
                raise _Stop

    t0 = time.perf_counter()
    try:
        train_detector(images, boxes, labels, cfg, log=say, max_steps=steps, progress=False, log_every=1)
    except _Stop:
        pass
    return _per_step(times)


def child(args) -> None:
    """One policy: every workload and load in this process; prints one JSON line."""
    import contextlib

    import torch

    from instsim.threads import ThreadGovernor

    policy = args.child
    setups = {"nerf": _nerf_setup(Path(args.data)), "detector": _det_setup()}
    loads = ["idle", "busy"] + (["late"] if policy == "new" else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1 if policy == "one" else 2)
        _run_nerf(setups["nerf"], 3, 1e9, Path(tmp))  # warm-up: first-call costs out of every timed run
        _run_det(setups["detector"], 3, 1e9)
        for work in ("nerf", "detector"):
            for load in loads:
                busy = _busy() if load == "busy" else None
                if busy is not None:
                    time.sleep(0.5)  # running before the work starts, as another user's job would be
                choices: list = []
                if policy == "new":
                    gov = ThreadGovernor(max_threads=2, log=lambda m: None)
                    ctx = gov
                else:
                    torch.set_num_threads(1 if policy == "one" else 2)
                    gov, ctx = None, contextlib.nullcontext()
                late = None
                if load == "late":
                    late = subprocess.Popen(
                        [sys.executable, "-c", f"import time, os; time.sleep({args.late_s}); os.execv({sys.executable!r}, [{sys.executable!r}, '-c', {BUSY!r}])"]
                    )
                budget = args.budget_s * (2 if load == "late" else 1)
                try:
                    with ctx:
                        if work == "nerf":
                            n, wall = _run_nerf(setups["nerf"], args.steps, budget, Path(tmp))
                        else:
                            n, wall = _run_det(setups["detector"], args.steps, budget)
                        if gov is not None:
                            choices = gov.choices
                finally:
                    for p in (busy, late):
                        if p is not None:
                            p.kill()
                            p.wait()
                rows.append({"policy": policy, "work": work, "load": load, "steps": n, "wall_s": round(wall, 3),
                             "s_per_step": round(wall / max(n, 1), 4), "threads_at_end": torch.get_num_threads(),
                             "governor_choices": choices})
                print(f"{policy:12s} {work:9s} {load:5s} {n:4d} steps {wall:7.2f} s  {wall / max(n, 1):.4f} s/step",
                      file=sys.stderr, flush=True)
    print(json.dumps(rows), flush=True)


def make_data(folder: Path) -> None:
    """The default config's first class (fist), 96 px, 100 train views, with its intrinsics.json."""
    import yaml

    from instsim.io import write_json
    from instsim.stages.dataset import generate_procedural
    from instsim.stages.intrinsics import extract_intrinsics

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    ds = dict(cfg["dataset"])
    ds["views"] = {"train": ds["views"]["train"], "val": 1, "test": 1}
    generate_procedural("fist", folder, ds, seed=int(cfg["seed"]), progress=False)
    write_json(folder / "intrinsics.json", extract_intrinsics(folder / "transforms_train.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_contention.json"))
    ap.add_argument("--data", help="a class folder with transforms_train.json and intrinsics.json (default: generated)")
    ap.add_argument("--steps", type=int, default=60, help="most steps per run")
    ap.add_argument("--budget-s", type=float, default=4.0, help="a run stops after this many seconds of work")
    ap.add_argument("--late-s", type=float, default=2.0, help="'late' load: seconds before the busy process starts")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    ap.add_argument("--note", default="", help="where and how it ran (machine, pinning), for the JSON")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import torch

    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "fist"
        if not args.data:
            make_data(data)
        rows = []
        for policy in args.policies:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            env.pop("OMP_NUM_THREADS", None)
            env.pop("OMP_WAIT_POLICY", None)
            if policy == "old_passive":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            cmd = [sys.executable, __file__, "--child", policy, "--data", str(data), "--steps", str(args.steps),
                   "--budget-s", str(args.budget_s), "--late-s", str(args.late_s)]
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
            rows += json.loads(proc.stdout.strip().splitlines()[-1])
    by = {(r["policy"], r["work"], r["load"]): r["s_per_step"] for r in rows}
    ratios = {}
    for policy in args.policies:
        for work in ("nerf", "detector"):
            idle = by.get((policy, work, "idle"))
            for load in ("busy", "late"):
                if idle and (policy, work, load) in by:
                    ratios[f"{policy}/{work}/{load}_vs_idle"] = round(by[(policy, work, load)] / idle, 2)
    for work in ("nerf", "detector"):
        if ("new", work, "busy") in by and ("new", work, "idle") in by and ("old", work, "idle") in by:
            # the target: under one competing process a stage no more than ~2.5x slower than the idle machine
            ratios[f"new/{work}/busy_vs_best_idle"] = round(
                by[("new", work, "busy")] / min(by[(p, work, "idle")] for p in args.policies if (p, work, "idle") in by), 2)
    result = {
        "benchmark": "cpu_contention",
        "note": args.note,
        "affinity_cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_parallel": torch.__config__.parallel_info().splitlines()[:4],
        "config": {"steps": args.steps, "budget_s": args.budget_s, "late_s": args.late_s,
                   "nerf": "NerfConfig.cpu(), fist, 96 px, 100 views (config.yaml dataset)",
                   "detector": "DetectorConfig defaults, 64 px, batch 32, 600 random images"},
        "wall_s_total": round(time.time() - t_start, 1),
        "runs": rows,
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
