"""import_coco_target: one split of the user's COCO target set, checked and resized into results/target/{split}."""

from instsim.poses import PoseSpace
from instsim.io import write_json
from instsim.stages.coco_target import DEFAULT_RESIZE, coco_source, import_coco_target, read_target_distribution
from instsim.stages.runner import run_stage


def main(sm):
    split, target, classes = sm.wildcards.tsplit, sm.params.target, list(sm.params.classes)
    space = PoseSpace.from_config(sm.params.pose_space)
    # the known distribution is read before anything is written: a bad one must leave no finished-looking split
    known = None
    if "distribution_file" in target:
        known = read_target_distribution(target["distribution_file"], space, classes)
    source = coco_source(target[split], f"target.{split}")
    import_coco_target(source, classes, int(target["image_size"]), target.get("resize", DEFAULT_RESIZE),
                       sm.output.images, sm.output.annotations, split=split)
    if known is not None:
        write_json(sm.output.distribution, {
            "pose_space": space.to_dict(),
            "probabilities": {f: [float(p) for p in known[f]] for f in space.FACTORS},
            "classes": sorted(classes),
            "note": f"target pose distribution given by the config (target.distribution_file: {target['distribution_file']})",
        })


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
