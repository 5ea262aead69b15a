"""optimize_distribution(_control): Neural-Sim's bilevel optimization of the pose distribution through the class
NeRFs (or its control, psi frozen), steered by target/val; neuralsim_control_comparison: both trajectories in one
plot. The rules are in workflow/rules/neuralsim.smk."""

import logging
import shutil
from pathlib import Path

import torch

from instsim.cameras import PoseSpace
from instsim.stages.config import resolve_device
from instsim.errors import InputError
from instsim.io import atomic_path, read_json, write_json
from instsim.neuralsim.distribution import PoseDistribution
from instsim.neuralsim.config import NeuralSimConfig
from instsim.neuralsim.loop import optimize_distribution
from instsim.neuralsim.objective import ValSet
from instsim.neuralsim.samples import ClassRenderers
from instsim.neuralsim.step import BilevelProblem
from instsim.stages.neuralsim_plots import (
    plot_control_comparison,
    plot_learned_vs_target,
    plot_probabilities,
    read_trajectory,
)
from instsim.stages.runner import run_stage
from instsim.stages.strategies import detector_config, load_class_nerfs, load_coco_images
from instsim.synthesis import DetectionCamera

log = logging.getLogger("instsim")


def _tv_per_factor(dist: PoseDistribution, space: PoseSpace, classes, cfg: NeuralSimConfig, target) -> dict:
    """``{factor: {"initial": tv, "final": tv}}``, each the mean over classes (the initial psi is uniform)."""
    initial = PoseDistribution(space, classes, learned=cfg.learned)
    out = {}
    for f in space.FACTORS:
        out[f] = {name: d.tv_to(target, factors=[f])["mean"] for name, d in (("initial", initial), ("final", dist))}
    return out


def optimize(sm):
    classes, p = list(sm.params.classes), sm.params
    torch.set_num_threads(sm.threads)
    device = resolve_device(p.device)
    space = PoseSpace.from_config(p.pose_space)
    cfg = NeuralSimConfig.from_dict(p.neuralsim, source="config")
    models, centres, radii = load_class_nerfs(dict(zip(classes, sm.input.checkpoints)), dict(zip(classes, sm.input.intrinsics)), device)
    coco, images, boxes, labels = load_coco_images(sm.input.annotations, sm.input.images)
    target_file = read_json(sm.input.distribution, "target distribution")
    if not isinstance(target_file, dict) or "probabilities" not in target_file:
        raise InputError(sm.input.distribution, "probabilities", "missing (target pose distribution)")
    target = space.check_probs(target_file["probabilities"], source=str(sm.input.distribution), field="probabilities")
    det_cfg = detector_config(p.detector["settings"], p.target["image_size"], len(classes), p.run_seed)
    resume = Path(p.resume)
    log_tsv = resume.with_name("trajectory.tsv")
    renders = ClassRenderers(models, centres, DetectionCamera.from_target_config(p.target), radii)
    problem = BilevelProblem(renders, space, ValSet(images, boxes, labels, coco), det_cfg, target, device)
    dist, _, rows = optimize_distribution(
        problem, cfg, seed=cfg.seed + 1000 * int(p.run_seed), checkpoint_path=resume, log_tsv=log_tsv,
        update_psi=p.update_psi, log_fn=log.info,
    )
    out = dist.to_dict()
    out["neuralsim"] = {
        "update_psi": bool(p.update_psi), "iterations": cfg.iterations, "config": cfg.to_dict(),
        "tv_to_target": {"initial": rows[0]["tv_to_target"], "final": rows[-1]["tv_to_target"]},
        # per factor (mean over classes), learned or not: the azimuth one is what the target shift is about
        "tv_to_target_per_factor": _tv_per_factor(dist, space, classes, cfg, target),
        "val_loss": {"initial": rows[0]["val_loss"], "final": rows[-1]["val_loss"]},
        "val_AP": {"initial": rows[0]["val_AP"], "final": rows[-1]["val_AP"]},
    }
    write_json(sm.output.distribution, out)
    with atomic_path(sm.output.trajectory) as tmp:
        shutil.copyfile(log_tsv, tmp)
    if hasattr(sm.output, "probabilities"):
        df = read_trajectory(sm.output.trajectory)
        plot_probabilities(df, sorted(classes), sm.output.probabilities, target={f: v.tolist() for f, v in target.items()})
        initial = {c: {f: [1.0 / space.factor(f).bins] * space.factor(f).bins for f in space.FACTORS} for c in classes}
        plot_learned_vs_target(out, sm.output.learned_vs_target, target={f: v.tolist() for f, v in target.items()},
                               initial=initial)
    log.info("%s: TV to target %.3f -> %.3f, val loss %.4f -> %.4f", sm.rule, rows[0]["tv_to_target"],
             rows[-1]["tv_to_target"], rows[0]["val_loss"], rows[-1]["val_loss"])
    # a later forced rerun must optimize afresh, not "resume" a finished run
    shutil.rmtree(resume.parent)


def compare(sm):
    target = read_json(sm.input.target, "target distribution")
    if not isinstance(target, dict) or "probabilities" not in target:
        raise InputError(sm.input.target, "probabilities", "missing (target pose distribution)")
    plot_control_comparison(read_trajectory(sm.input.learned), read_trajectory(sm.input.control), sm.output[0],
                            target=target["probabilities"])


def main(sm):
    (compare if sm.rule == "neuralsim_control_comparison" else optimize)(sm)


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
