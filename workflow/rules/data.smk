# Per-class datasets (BlenderNeRF format) and the camera facts derived from them.


rule generate_dataset:
    input:
        class_source_files,
    output:
        transforms=expand(res("data/{{cls}}/transforms_{split}.json"), split=SPLITS),
        views=directory(expand(res("data/{{cls}}/{split}"), split=SPLITS)),
    log:
        res("logs/generate_dataset/{cls}.log"),
    benchmark:
        res("benchmarks/generate_dataset/{cls}.tsv")
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    params:
        source=lambda wc: config["classes"][wc.cls],
        dataset=config["dataset"],
        seed=config["seed"],
        device=config["device"],
    script:
        "../scripts/generate_dataset.py"


rule extract_intrinsics:
    input:
        res("data/{cls}/transforms_train.json"),
    output:
        res("data/{cls}/intrinsics.json"),
    log:
        res("logs/extract_intrinsics/{cls}.log"),
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    script:
        "../scripts/extract_intrinsics.py"
