# The detection target domain, per split (val steers Neural-Sim, test is held out): COCO annotations and images.
# target.source picks the rule: render_target (rendered, the default) or import_coco_target (the user's COCO sets).


if TARGET_SOURCE == "coco":

    rule import_coco_target:
        input:
            unpack(coco_target_inputs),
        output:
            **target_outputs(),
        log:
            res("logs/import_coco_target/{tsplit}.log"),
        benchmark:
            res("benchmarks/import_coco_target/{tsplit}.tsv")
        resources:
            mem_mb=lambda wc, attempt: 2000 * attempt,
            runtime=lambda wc, attempt: 30 * attempt,
        params:
            classes=CLASSES,
            pose_space=config["pose_space"],
            target=config["target"],
        script:
            "../scripts/import_coco_target.py"

else:

    rule render_target:
        input:
            unpack(render_target_inputs),
        output:
            **target_outputs(),
        log:
            res("logs/render_target/{tsplit}.log"),
        benchmark:
            res("benchmarks/render_target/{tsplit}.tsv")
        resources:
            mem_mb=lambda wc, attempt: 2000 * attempt,
            runtime=lambda wc, attempt: 30 * attempt,
        params:
            classes=rendered_target_classes(),
            pose_space=config["pose_space"],
            target=config["target"],
            seed=config["seed"],
            device=config["device"],
        script:
            "../scripts/render_target.py"
