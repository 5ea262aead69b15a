"""render_target: the detection target domain (one split) with COCO annotations."""

from instsim.poses import PoseSpace
from instsim.io import read_json
from instsim.stages.config import resolve_device
from instsim.stages.intrinsics import camera_radius
from instsim.stages.runner import run_stage
from instsim.stages.target import render_target


def main(sm):
    space = PoseSpace.from_config(sm.params.pose_space)
    probs = space.check_probs(sm.params.target["distribution"], source="config", field="target.distribution")
    # input.intrinsics follows the config's class order (CLASSES), as params.classes does
    names = list(sm.params.classes)
    radii = {c: camera_radius(read_json(path, "intrinsics file"), path) for c, path in zip(names, sm.input.intrinsics)}
    render_target(
        sm.params.classes,
        space,
        probs,
        sm.params.target,
        sm.wildcards.tsplit,
        sm.params.seed,
        sm.output.images,
        sm.output.annotations,
        sm.output.distribution,
        radii,
        device=resolve_device(sm.params.device),
    )


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
