# The detection target domain: images at the target pose distribution, COCO annotations.


rule render_target:
    input:
        # each class's mean training-camera distance: the world units of one unit of zoom
        intrinsics=expand(res("data/{cls}/intrinsics.json"), cls=CLASSES),
    output:
        images=directory(res("target/{tsplit}/images")),
        annotations=res("target/{tsplit}/annotations.json"),
        distribution=res("target/{tsplit}/distribution.json"),
    log:
        res("logs/render_target/{tsplit}.log"),
    benchmark:
        res("benchmarks/render_target/{tsplit}.tsv")
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    params:
        classes=config["classes"],
        pose_space=config["pose_space"],
        target=config["target"],
        seed=config["seed"],
        device=config["device"],
    script:
        "../scripts/render_target.py"
