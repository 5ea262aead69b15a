"""train_detector: render a synthetic set from the class NeRFs at a strategy's pose distribution, train a detector."""

import logging
import shutil
from pathlib import Path

import pandas as pd

from instsim.poses import PoseSpace
from instsim.stages.config import resolve_device
from instsim.detect import save_detector, train_detector
from instsim.io import atomic_path, to_uint8, write_png
from instsim.stages.report import draw_boxes, image_grid
from instsim.seeds import derive_seed
from instsim.stages.runner import run_stage
from instsim.stages.strategies import detector_config, load_class_nerfs, strategy_probs
from instsim.synthesis import DetectionCamera, make_synthetic_set

log = logging.getLogger("instsim")


def main(sm):
    classes, seed = sm.params.classes, int(sm.wildcards.seed)
    device = resolve_device(sm.params.device)
    space = PoseSpace.from_config(sm.params.pose_space)
    probs = strategy_probs(sm.wildcards.strategy, classes, space, sm.input.get("distribution"))
    models, centres, radii = load_class_nerfs(
        dict(zip(classes, sm.input.checkpoints)), dict(zip(classes, sm.input.intrinsics)), device
    )
    det = sm.params.detector
    # the same seed gives every strategy the same backgrounds, shifts and jitter streams
    synth = make_synthetic_set(
        models, centres, probs, space, DetectionCamera.from_target_config(sm.params.target), det["images_per_class"],
        seed=derive_seed(sm.params.run_seed, seed), radii=radii,
    )
    log.info("%s: rendered %d training images (%s)", sm.wildcards.strategy, len(synth.images), synth.class_names)
    cfg = detector_config(det["settings"], sm.params.target["image_size"], len(classes), seed)
    images = synth.images.permute(0, 3, 1, 2).contiguous()
    boxes = [b[None] for b in synth.boxes]
    labels = [l[None] for l in synth.labels]
    history = []
    resume = Path(sm.params.resume)
    model = train_detector(
        images, boxes, labels, cfg, log=log.info, checkpoint_path=resume, history=history,
        device=device,
    )
    save_detector(model, sm.output.model)
    with atomic_path(sm.output.train_log) as tmp:
        pd.DataFrame(history).to_csv(tmp, sep="\t", index=False)
    shown = [draw_boxes(to_uint8(synth.images[i].numpy()), [synth.boxes[i].tolist()], [(255, 255, 255)])
             for i in range(0, len(synth.images), max(1, len(synth.images) // 24))][:24]
    write_png(sm.output.samples, image_grid(shown, columns=8))
    shutil.rmtree(resume.parent)


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
