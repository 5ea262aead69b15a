"""render_target: the detection target domain (one split) with COCO annotations."""

from instsim.cameras import PoseSpace
from instsim.stages.config import resolve_device
from instsim.stages.runner import run_stage
from instsim.stages.target import render_target


def main(sm):
    space = PoseSpace.from_config(sm.params.pose_space)
    probs = space.check_probs(sm.params.target["distribution"], source="config", field="target.distribution")
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
        device=resolve_device(sm.params.device),
    )


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
