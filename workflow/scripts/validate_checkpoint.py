"""validate_checkpoint: PSNR/SSIM of a class's NeRF on its test views; fails the rule below min_psnr."""

import logging
from pathlib import Path

import numpy as np

from instsim.stages.config import resolve_device
from instsim.errors import InstsimError
from instsim.io import read_json, write_json, write_png
from instsim.nerf.checkpoint import expect_from_intrinsics, load_checkpoint
from instsim.nerf.validate import convention_check, unseen_poses, validate_checkpoint
from instsim.scene import make_hand, render_alpha_depth
from instsim.stages.runner import run_stage
from instsim.transforms import load_views

log = logging.getLogger("instsim")


def main(sm):
    device = resolve_device(sm.params.device)
    info = read_json(sm.input.intrinsics)
    model, meta = load_checkpoint(sm.input.checkpoint, expect=expect_from_intrinsics(info), device=device)
    views = load_views(sm.input.transforms)
    rows = []  # the views' strips, in the order of the test views' file names (as the strips folder was)
    order = sorted(range(len(views.file_paths)), key=lambda i: Path(views.file_paths[i]).stem)
    result = validate_checkpoint(
        model, views, background=sm.params.background, min_psnr=sm.params.min_psnr, comparisons=rows, device=device
    )
    rows = [rows[i] for i in order]
    source = sm.params.source
    if source["source"] == "procedural":
        # the NeRF must agree with the ground-truth renderer at poses it never saw (catches flipped axes);
        # the true coverage is ray-traced on the stage's device, without shading (only alpha is compared)
        poses = unseen_poses(info, n=5, seed=sm.params.seed)
        scene = make_hand(source["gesture"]).to(device)
        alpha = render_alpha_depth(scene, poses.to(device), views.intrinsics, supersample=2)[0].cpu()
        result["convention_check"] = convention_check(
            model, poses, views.intrinsics, alpha, min_iou=sm.params.min_mask_iou, device=device
        )
        result["passed"] = result["passed"] and result["convention_check"]["passed"]
    result["checkpoint_step"] = meta["step"]
    log.info(
        "%s: PSNR %.2f dB, SSIM %.4f on %d test views (background %s), passed=%s",
        sm.wildcards.cls, result["psnr"], result["ssim"], result["n_views"], result["background"], result["passed"],
    )
    if not result["passed"]:
        failed = Path(sm.output.metrics).with_name("validation.failed.json")
        write_json(failed, result)
        reasons = []
        if result["psnr"] < sm.params.min_psnr:
            reasons.append(f"test PSNR {result['psnr']:.2f} dB < min_psnr {sm.params.min_psnr}")
        if "convention_check" in result and not result["convention_check"]["passed"]:
            reasons.append(
                f"mask IoU {result['convention_check']['min_iou']:.3f} < min_mask_iou {sm.params.min_mask_iou} at an unseen pose"
            )
        raise InstsimError(
            f"{sm.input.checkpoint}: NeRF of class '{sm.wildcards.cls}' failed validation: {'; '.join(reasons)}. "
            f"Metrics: {failed}. Train longer (nerf.steps) or lower nerf.min_psnr / nerf.min_mask_iou."
        )
    # zlib level 1: the 10-view strip of an 800 px run took ~10 s to write at the default level 6
    write_png(sm.output.comparison, np.concatenate(rows, axis=0), compress_level=1)
    write_json(sm.output.metrics, result)


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
