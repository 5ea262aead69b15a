"""train_nerf: train (or resume after a kill) one class's Instant-NeRF."""

import logging
import shutil
from pathlib import Path

from instsim.stages.config import nerf_config, resolve_device
from instsim.io import atomic_path, read_json
from instsim.nerf.train import train_nerf
from instsim.stages.runner import run_stage
from instsim.transforms import load_views


def main(sm):
    p = sm.params.nerf
    device = str(resolve_device(p["device"]))
    cfg = nerf_config(p["preset"], p["overrides"], device=device, seed=p["seed"])
    # periodic state and the growing log live in resume/, which survives a killed job
    resume = Path(sm.params.resume)
    final, log_tsv = resume.with_name("final.pt"), resume.with_name("train_log.tsv")
    summary = train_nerf(
        load_views(sm.input.transforms),
        read_json(sm.input.intrinsics),
        cfg,
        checkpoint_path=final,
        log_tsv_path=log_tsv,
        resume_path=resume,
    )
    for src, dst in ((log_tsv, sm.output.train_log), (final, sm.output.checkpoint)):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    # a later forced rerun must train afresh, not "resume" a finished run
    shutil.rmtree(resume.parent)
    logging.getLogger("instsim").info("trained %s: %s", sm.wildcards.cls, summary)


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
