"""evaluate: COCO metrics (pycocotools) of one detector on the held-out target test split."""

import logging

from instsim.detect import detections_to_coco, evaluate_coco, load_detector, predict
from instsim.io import write_json
from instsim.stages.runner import run_stage
from instsim.stages.strategies import load_coco_images

log = logging.getLogger("instsim")


def main(sm):
    model = load_detector(sm.input.model)
    coco, images, _, _ = load_coco_images(sm.input.annotations, sm.input.images)
    detections = predict(model, images)
    metrics = evaluate_coco(coco, detections)
    log.info("%s seed %s: AP %.3f AP50 %.3f AP75 %.3f\n%s", sm.wildcards.strategy, sm.wildcards.seed,
             metrics["AP"], metrics["AP50"], metrics["AP75"], metrics.pop("log", ""))
    write_json(sm.output.detections, detections_to_coco(detections, [img["id"] for img in coco["images"]]))
    write_json(sm.output.metrics, {"strategy": sm.wildcards.strategy, "seed": int(sm.wildcards.seed), **metrics})


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
