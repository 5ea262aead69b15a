"""optimize_distribution(_control): Neural-Sim's bilevel optimization of the pose distribution through the class
NeRFs (or its control, psi frozen), steered by target/val; neuralsim_control_comparison: both trajectories in one
plot. The rules are in workflow/rules/neuralsim.smk."""

import logging
import shutil
from pathlib import Path

from instsim.poses import PoseSpace
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
from instsim.seeds import derive_seed
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


def _known_target(path, space: PoseSpace):
    """The target pose distribution ``{factor: (bins,)}`` where it is known (a rendered target, or a COCO one with
    ``target.distribution_file``), else None: then the TV-to-target columns stay empty."""
    if path is None:
        return None
    target_file = read_json(path, "target distribution")
    if not isinstance(target_file, dict) or "probabilities" not in target_file:
        raise InputError(path, "probabilities", "missing (target pose distribution)")
    return space.check_probs(target_file["probabilities"], source=str(path), field="probabilities")


def _tv(row) -> str:
    return f"{row['tv_to_target']:.3f}" if row["tv_to_target"] is not None else "unknown"


def optimize(sm):
    classes, p = list(sm.params.classes), sm.params
    device = resolve_device(p.device)
    space = PoseSpace.from_config(p.pose_space)
    cfg = NeuralSimConfig.from_dict(p.neuralsim, source="config")
    models, centres, radii = load_class_nerfs(dict(zip(classes, sm.input.checkpoints)), dict(zip(classes, sm.input.intrinsics)), device)
    coco, images, boxes, labels = load_coco_images(sm.input.annotations, sm.input.images)
    target = _known_target(sm.input.get("distribution"), space)
    det_cfg = detector_config(p.detector["settings"], p.target["image_size"], len(classes), p.run_seed)
    resume = Path(p.resume)
    log_tsv = resume.with_name("trajectory.tsv")
    renders = ClassRenderers(models, centres, DetectionCamera.from_target_config(p.target), radii)
    problem = BilevelProblem(renders, space, ValSet(images, boxes, labels, coco), det_cfg, target, device)
    dist, _, rows = optimize_distribution(
        problem, cfg, seed=derive_seed(int(p.run_seed), cfg.seed), checkpoint_path=resume, log_tsv=log_tsv,
        update_psi=p.update_psi, log_fn=log.info,
    )
    out = dist.to_dict()
    out["neuralsim"] = {
        "update_psi": bool(p.update_psi), "iterations": cfg.iterations, "config": cfg.to_dict(),
        "tv_to_target": {"initial": rows[0]["tv_to_target"], "final": rows[-1]["tv_to_target"]},
        # per factor (mean over classes), learned or not: the azimuth one is what the target shift is about;
        # None where the target's distribution is unknown (a COCO target without target.distribution_file)
        "tv_to_target_per_factor": _tv_per_factor(dist, space, classes, cfg, target) if target is not None else None,
        "val_loss": {"initial": rows[0]["val_loss"], "final": rows[-1]["val_loss"]},
        "val_AP": {"initial": rows[0]["val_AP"], "final": rows[-1]["val_AP"]},
    }
    write_json(sm.output.distribution, out)
    with atomic_path(sm.output.trajectory) as tmp:
        shutil.copyfile(log_tsv, tmp)
    if hasattr(sm.output, "probabilities"):
        df = read_trajectory(sm.output.trajectory)
        shown = {f: v.tolist() for f, v in target.items()} if target is not None else None
        plot_probabilities(df, sorted(classes), sm.output.probabilities, target=shown)
        initial = {c: {f: [1.0 / space.factor(f).bins] * space.factor(f).bins for f in space.FACTORS} for c in classes}
        plot_learned_vs_target(out, sm.output.learned_vs_target, target=shown, initial=initial)
    log.info("%s: TV to target %s -> %s, val loss %.4f -> %.4f", sm.rule, _tv(rows[0]), _tv(rows[-1]),
             rows[0]["val_loss"], rows[-1]["val_loss"])
    # a later forced rerun must optimize afresh, not "resume" a finished run
    shutil.rmtree(resume.parent)


def compare(sm):
    probabilities = None
    if sm.input.get("target") is not None:  # absent for a COCO target without a known distribution
        target = read_json(sm.input.target, "target distribution")
        if not isinstance(target, dict) or "probabilities" not in target:
            raise InputError(sm.input.target, "probabilities", "missing (target pose distribution)")
        probabilities = target["probabilities"]
    plot_control_comparison(read_trajectory(sm.input.learned), read_trajectory(sm.input.control), sm.output[0],
                            target=probabilities)


def main(sm):
    (compare if sm.rule == "neuralsim_control_comparison" else optimize)(sm)


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
