"""The default pipeline without Snakemake, for a machine that has no Snakemake (the device machine): every job is the
workflow's own stage script (``workflow/scripts/<rule>.py``) run with a stand-in ``snakemake`` object whose inputs,
outputs and params are the rules' (``workflow/rules/*.smk``), each job in its own process, jobs of one phase in
parallel. On top of the workflow's one ``neuralsim`` run it runs several Neural-Sim *variants* (config overrides of the
``neuralsim`` section, e.g. another estimator or loop seed) on the same data, NeRFs and target, each with its own
detectors and evaluations, so variants are compared on the same uniform and oracle baselines.

    python benchmarks/neuralsim_pipeline.py --config config.yaml --results results \\
        --variant sf0 '{"estimator": "score_function", "seed": 0}' --variant sf1 '{"estimator": "score_function", "seed": 1}'

Writes ``<results>/pipeline_summary.json``: per stage job its wall time, per strategy/variant and detector seed the
COCO AP, the Neural-Sim TV per factor and the control's trajectory summary. With ``--loop-device cpu`` each Neural-Sim loop is
pinned to ``--loop-cores`` cores of its own (Linux ``taskset``), so its time is a time on a machine of that many
cores (the default run targets 2); the other jobs share the remaining cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------------------
# one job: run a stage script in this process with a stand-in snakemake object
# ---------------------------------------------------------------------------------------------------------


class Named(list):
    """Snakemake's Namedlist: positional items, then named ones (a named list flattened), by attribute too."""

    def __init__(self, *items: Any, **named: Any) -> None:
        flat = [str(i) for i in items]
        self._named: dict[str, Any] = {}
        for key, value in named.items():
            if isinstance(value, (list, tuple)):
                value = [str(v) for v in value]
                flat.extend(value)
            elif isinstance(value, Path):
                value = str(value)
                flat.append(value)
            else:
                flat.append(value)
            self._named[key] = value
        super().__init__(flat)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._named[name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return self._named.get(name, default)

    def items(self):
        return self._named.items()


class Job:
    def __init__(self, spec: dict) -> None:
        self.rule = spec["rule"]
        self.input = Named(*spec.get("input_list", []), **spec.get("input", {}))
        self.output = Named(*spec.get("output_list", []), **spec.get("output", {}))
        self.params = Named(**spec.get("params", {}))
        self.log = Named(spec["log"])
        self.wildcards = Named(**spec.get("wildcards", {}))
        self.resources = Named()
        self.threads = int(spec.get("threads", 1))


def run_job(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import runpy

    sys.argv = [spec["script"]]
    runpy.run_path(str(SCRIPTS / spec["script"]), init_globals={"snakemake": Job(spec)}, run_name="__main__")


# ---------------------------------------------------------------------------------------------------------
# the jobs of the default pipeline (as workflow/rules/*.smk)
# ---------------------------------------------------------------------------------------------------------


class Pipeline:
    """The jobs of one results folder. ``loop_device``: where the Neural-Sim loops run (``cpu``: each pinned to
    ``loop_cores`` cores of its own, the first cores of the machine, so its time is a time on that many cores);
    every other job runs on the config's ``device`` and shares the remaining cores."""

    def __init__(self, cfg: dict, results: Path, log_dir: Path, loop_device: str | None, loop_cores: int) -> None:
        self.cfg, self.r, self.log_dir = cfg, results, log_dir
        self.loop_device, self.loop_cores = loop_device, loop_cores
        self.classes = list(cfg["classes"])
        self.times: dict[str, float] = {}
        self.failed: dict[str, int] = {}
        self.ncpu = os.cpu_count() or 1
        self._loops = 0

    def res(self, p: str) -> str:
        return str(self.r / p)

    def _spec(self, name: str, rule: str, script: str, **kw) -> dict:
        spec = {"rule": rule, "script": script, "log": self.res(f"logs/{name}.log"), **kw}
        for key in ("input", "output", "params"):
            spec[key] = json.loads(json.dumps(spec.get(key, {}), default=str))
        return spec

    def _cores(self, spec: dict, n_loops: int) -> list[int] | None:
        """Dedicated cores for a pinned loop job, the shared rest for the others (None: no pinning)."""
        if not sys.platform.startswith("linux") or self.loop_device != "cpu" or not self.loop_cores:
            return None
        reserved = min(self.ncpu - 1, n_loops * self.loop_cores)
        if spec.get("pinned_loop") is not None:
            first = spec["pinned_loop"] * self.loop_cores
            return [(first + i) % max(1, reserved) for i in range(self.loop_cores)]
        return list(range(reserved, self.ncpu)) if n_loops else None

    def _launch(self, name: str, spec: dict, n_loops: int = 0) -> int:
        path = self.log_dir / f"{name.replace('/', '_')}.json"
        path.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "--job", str(path)]
        cores = self._cores(spec, n_loops)
        if cores:
            cmd = ["taskset", "-c", ",".join(map(str, cores))] + cmd
        threads = self.loop_cores if spec.get("pinned_loop") is not None else int(spec.get("threads", 1))
        path_env = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads)), "PYTHONPATH": path_env}
        t0 = time.perf_counter()
        with open(self.log_dir / f"{name.replace('/', '_')}.out", "w") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.times[name] = round(time.perf_counter() - t0, 2)
        if rc:
            self.failed[name] = rc
        print(f"{name}: exit {rc} in {self.times[name]:.1f} s (cores {cores})", flush=True)
        return rc

    def phase(self, jobs: dict[str, dict]) -> None:
        n_loops = sum(1 for sp in jobs.values() if sp.get("pinned_loop") is not None)
        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as ex:
            list(ex.map(lambda kv: self._launch(kv[0], kv[1], n_loops), jobs.items()))

    # -- the rules ---------------------------------------------------------------------------------------

    def datasets(self) -> dict:
        c = self.cfg
        return {f"generate_dataset/{k}": self._spec(f"generate_dataset/{k}", "generate_dataset", "generate_dataset.py",
                                                     output={"transforms": [self.res(f"data/{k}/transforms_{s}.json") for s in SPLITS],
                                                             "views": [self.res(f"data/{k}/{s}") for s in SPLITS]},
                                                     params={"source": c["classes"][k], "dataset": c["dataset"], "seed": c["seed"],
                                                             "device": c["device"]}, wildcards={"cls": k})
                for k in self.classes}

    def intrinsics(self) -> dict:
        return {f"extract_intrinsics/{k}": self._spec(f"extract_intrinsics/{k}", "extract_intrinsics", "extract_intrinsics.py",
                                                       input_list=[self.res(f"data/{k}/transforms_train.json")],
                                                       output_list=[self.res(f"data/{k}/intrinsics.json")], wildcards={"cls": k})
                for k in self.classes}

    def nerfs_and_target(self) -> dict:
        c = self.cfg
        nerf = c["nerf"]
        wf = ("preset", "min_psnr", "min_mask_iou", "validation_background")
        jobs = {}
        for k in self.classes:
            jobs[f"train_nerf/{k}"] = self._spec(
                f"train_nerf/{k}", "train_nerf", "train_nerf.py", threads=2,
                input={"transforms": self.res(f"data/{k}/transforms_train.json"), "intrinsics": self.res(f"data/{k}/intrinsics.json")},
                output={"checkpoint": self.res(f"nerf/{k}/checkpoint.pt"), "train_log": self.res(f"nerf/{k}/train_log.tsv")},
                params={"nerf": {"preset": nerf["preset"], "overrides": {a: b for a, b in nerf.items() if a not in wf},
                                 "device": c["device"], "seed": c["seed"]},
                        "resume": self.res(f"nerf/{k}/resume/state.pt")}, wildcards={"cls": k})
        for s in ("val", "test"):
            jobs[f"render_target/{s}"] = self._spec(
                f"render_target/{s}", "render_target", "render_target.py",
                input={"intrinsics": [self.res(f"data/{k}/intrinsics.json") for k in self.classes]},
                output={"images": self.res(f"target/{s}/images"), "annotations": self.res(f"target/{s}/annotations.json"),
                        "distribution": self.res(f"target/{s}/distribution.json")},
                params={"classes": c["classes"], "pose_space": c["pose_space"], "target": c["target"], "seed": c["seed"],
                        "device": c["device"]}, wildcards={"tsplit": s})
        return jobs

    def validations(self) -> dict:
        c = self.cfg
        return {f"validate_checkpoint/{k}": self._spec(
            f"validate_checkpoint/{k}", "validate_checkpoint", "validate_checkpoint.py",
            input={"checkpoint": self.res(f"nerf/{k}/checkpoint.pt"), "transforms": self.res(f"data/{k}/transforms_test.json"),
                   "intrinsics": self.res(f"data/{k}/intrinsics.json")},
            output={"metrics": self.res(f"nerf/{k}/validation.json"), "comparison": self.res(f"nerf/{k}/validation.png")},
            params={"min_psnr": c["nerf"]["min_psnr"], "min_mask_iou": c["nerf"]["min_mask_iou"],
                    "background": c["nerf"]["validation_background"], "device": c["device"], "source": c["classes"][k],
                    "seed": c["seed"]}, wildcards={"cls": k}) for k in self.classes}

    def _class_inputs(self) -> dict:
        return {"checkpoints": [self.res(f"nerf/{k}/checkpoint.pt") for k in self.classes],
                "validations": [self.res(f"nerf/{k}/validation.json") for k in self.classes],
                "intrinsics": [self.res(f"data/{k}/intrinsics.json") for k in self.classes]}

    def optimize(self, name: str, neuralsim: dict, update_psi: bool) -> dict:
        c = self.cfg
        device = self.loop_device
        out = {"distribution": self.res(f"{name}/distribution.json"), "trajectory": self.res(f"{name}/trajectory.tsv")}
        if update_psi:
            out.update(probabilities=self.res(f"{name}/probabilities.png"), learned_vs_target=self.res(f"{name}/learned_vs_target.png"))
        return self._spec(f"optimize_distribution/{name}", "optimize_distribution" if update_psi else "optimize_distribution_control",
                          "optimize_distribution.py", threads=2,
                          input={**self._class_inputs(), "annotations": self.res("target/val/annotations.json"),
                                 "images": self.res("target/val/images"), "distribution": self.res("target/val/distribution.json")},
                          output=out,
                          params={"classes": self.classes, "pose_space": c["pose_space"], "target": c["target"],
                                  "detector": c["detector"], "neuralsim": neuralsim, "device": device or c["device"],
                                  "run_seed": c["seed"], "update_psi": update_psi, "resume": self.res(f"{name}/resume/state.pt")},
                          pinned_loop=self._next_loop() if self.loop_device == "cpu" else None)

    def _next_loop(self) -> int:
        self._loops += 1
        return self._loops - 1

    def detector(self, strategy: str, seed: int, distribution: str | None, tag: str | None = None) -> tuple[str, dict]:
        c = self.cfg
        tag = tag or strategy
        inputs = self._class_inputs()
        if distribution is not None:
            inputs["distribution"] = distribution
        name = f"train_detector/{tag}/seed_{seed}"
        return name, self._spec(name, "train_detector", "train_detector.py", threads=2, input=inputs,
                                output={"model": self.res(f"detector/{tag}/seed_{seed}/model.pt"),
                                        "train_log": self.res(f"detector/{tag}/seed_{seed}/train_log.tsv"),
                                        "samples": self.res(f"detector/{tag}/seed_{seed}/train_samples.png")},
                                params={"classes": self.classes, "pose_space": c["pose_space"], "target": c["target"],
                                        "detector": c["detector"], "device": c["device"], "run_seed": c["seed"],
                                        "resume": self.res(f"detector/{tag}/seed_{seed}/resume/state.pt")},
                                wildcards={"strategy": strategy, "seed": str(seed)})

    def evaluate(self, strategy: str, seed: int, tag: str | None = None) -> tuple[str, dict]:
        tag = tag or strategy
        name = f"evaluate/{tag}/seed_{seed}"
        return name, self._spec(name, "evaluate", "evaluate.py",
                                input={"model": self.res(f"detector/{tag}/seed_{seed}/model.pt"),
                                       "annotations": self.res("target/test/annotations.json"), "images": self.res("target/test/images")},
                                output={"metrics": self.res(f"eval/{tag}/seed_{seed}.json"),
                                        "detections": self.res(f"eval/{tag}/seed_{seed}_detections.json")},
                                wildcards={"strategy": strategy, "seed": str(seed)})


def partial_oracle(p: Pipeline, factors: list[str]) -> str:
    """A distribution file with the target's probabilities for ``factors`` and uniform ones for the other factors."""
    target = json.loads(Path(p.res("target/val/distribution.json")).read_text())
    probs = {f: (v if f in factors else [1.0 / len(v)] * len(v)) for f, v in target["probabilities"].items()}
    unknown = set(factors) - set(probs)
    if unknown:
        raise SystemExit(f"--partial-oracle: no factor {sorted(unknown)} in the target (has {sorted(probs)})")
    path = Path(p.res(f"oracle_{'_'.join(factors)}/distribution.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**target, "probabilities": probs}, indent=1) + "\n")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, default=REPO / "config.yaml")
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                    help="a Neural-Sim variant: name and neuralsim overrides (JSON); default one variant, the config's")
    ap.add_argument("--loop-device", default=None, help="device of the Neural-Sim loops (default the config's); cpu "
                    "pins each loop to --loop-cores cores of its own")
    ap.add_argument("--loop-cores", type=int, default=2)
    ap.add_argument("--partial-oracle", action="append", default=[], metavar="FACTORS",
                    help="also train detectors at the target's distribution of these comma-separated factors only, the "
                    "others uniform (chain oracle_<factors>): how much of the oracle's gain each factor carries")
    ap.add_argument("--skip-baselines", action="store_true",
                    help="with --skip-until optimize: reuse the uniform and oracle evaluations and the control of --results")
    ap.add_argument("--skip-until", default=None, choices=["nerf", "optimize"],
                    help="reuse the data and target (nerf) or also the NeRFs (optimize) of --results")
    args = ap.parse_args()
    if args.job:
        run_job(args.job)
        return
    cfg = yaml.safe_load(args.config.read_text())
    args.results.mkdir(parents=True, exist_ok=True)
    log_dir = args.results / "pipeline_jobs"
    log_dir.mkdir(parents=True, exist_ok=True)
    p = Pipeline(cfg, args.results, log_dir, args.loop_device, args.loop_cores)
    seeds = list(cfg["seeds"])
    variants = {name: {**cfg["neuralsim"], **json.loads(js)} for name, js in args.variant} or {"neuralsim": dict(cfg["neuralsim"])}
    t0 = time.perf_counter()
    if args.skip_until is None:
        p.phase(p.datasets())
        p.phase(p.intrinsics())
        p.phase(p.nerfs_and_target())
    if args.skip_baselines and args.skip_until != "optimize":
        raise SystemExit("--skip-baselines needs --skip-until optimize (the baselines' detectors must exist)")
    if args.skip_until in (None, "nerf"):
        if args.skip_until == "nerf":
            p.phase({k: v for k, v in p.nerfs_and_target().items() if k.startswith("train_nerf")})
        p.phase(p.validations())
    # after the NeRFs every strategy/variant is a chain of its own (optimize -> detectors -> evaluations), so a slow
    # variant does not hold up the others; the summary is rewritten whenever a chain ends
    p.n_loops = len(variants) + 1

    def chain(tag: str, strategy: str, dist: str | None, optimize: dict | None) -> None:
        if optimize is not None and p._launch(f"optimize_distribution/{tag}", optimize, p.n_loops):
            return
        with ThreadPoolExecutor(max_workers=len(seeds)) as ex:
            list(ex.map(lambda s: p._launch(*p.detector(strategy, s, dist, tag=tag), p.n_loops), seeds))
        with ThreadPoolExecutor(max_workers=len(seeds)) as ex:
            list(ex.map(lambda s: p._launch(*p.evaluate(strategy, s, tag=tag), p.n_loops), seeds))
        write_summary()

    def write_summary() -> None:
        summary = {"config": str(args.config), "variants": variants, "job_seconds": dict(p.times), "failed": dict(p.failed),
                   "wall_seconds": round(time.perf_counter() - t0, 1), "loop_device": args.loop_device,
                   "loop_cores": args.loop_cores, "cpu_count": os.cpu_count(), "AP": {}, "neuralsim": {}}
        for tag in ["uniform", "oracle", *partial, *variants]:
            aps = {}
            for s in seeds:
                f = Path(p.res(f"eval/{tag}/seed_{s}.json"))
                if f.exists():
                    m = json.loads(f.read_text())
                    aps[str(s)] = {k: m.get(k) for k in ("AP", "AP50", "AP75")}
            summary["AP"][tag] = aps
        for n in list(variants) + ["neuralsim_control"]:
            f = Path(p.res(f"{n}/distribution.json"))
            if f.exists():
                d = json.loads(f.read_text())
                summary["neuralsim"][n] = {"classes": d["classes"], **d.get("neuralsim", {})}
        tmp = args.results / "pipeline_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(args.results / "pipeline_summary.json")
        print("summary:", json.dumps({k: summary[k] for k in ("AP", "failed", "wall_seconds")}), flush=True)

    chains = [] if args.skip_baselines else [("uniform", "uniform", None, None),
                                             ("oracle", "oracle", p.res("target/val/distribution.json"), None)]
    partial = {f"oracle_{'_'.join(fs.split(','))}": partial_oracle(p, fs.split(",")) for fs in args.partial_oracle}
    chains += [(tag, "oracle", path, None) for tag, path in partial.items()]
    chains += [(n, "neuralsim", p.res(f"{n}/distribution.json"), p.optimize(n, v, True)) for n, v in variants.items()]
    control = p.optimize("neuralsim_control", dict(cfg["neuralsim"]), False)
    with ThreadPoolExecutor(max_workers=len(chains) + 1) as ex:
        futures = [ex.submit(chain, *c) for c in chains]
        if not args.skip_baselines:
            futures.append(ex.submit(lambda: (p._launch("optimize_distribution/neuralsim_control", control, p.n_loops),
                                              write_summary())))
        for f in futures:
            f.result()
    write_summary()


if __name__ == "__main__":
    main()
