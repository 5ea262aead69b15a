"""extract_intrinsics: camera and scene facts of one class from its training cameras."""

from instsim.stages.intrinsics import extract_intrinsics
from instsim.io import write_json
from instsim.stages.runner import run_stage


def main(sm):
    write_json(sm.output[0], extract_intrinsics(sm.input[0]))


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
