# One Instant-NeRF per class: training (resumable) and validation against held-out views.


rule train_nerf:
    input:
        transforms=res("data/{cls}/transforms_train.json"),
        intrinsics=res("data/{cls}/intrinsics.json"),
    output:
        checkpoint=res("nerf/{cls}/checkpoint.pt"),
        train_log=res("nerf/{cls}/train_log.tsv"),
    log:
        res("logs/train_nerf/{cls}.log"),
    benchmark:
        res("benchmarks/train_nerf/{cls}.tsv")
    threads: STAGE_THREADS
    resources:
        **gpu_resources(),
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    params:
        nerf=nerf_settings,
        # periodic checkpoints live outside the outputs, which Snakemake deletes when a job fails
        resume=lambda wc: res(f"nerf/{wc.cls}/resume/state.pt"),
    script:
        "../scripts/train_nerf.py"


rule validate_checkpoint:
    input:
        checkpoint=res("nerf/{cls}/checkpoint.pt"),
        transforms=res("data/{cls}/transforms_test.json"),
        intrinsics=res("data/{cls}/intrinsics.json"),
    output:
        metrics=res("nerf/{cls}/validation.json"),
        comparison=report(
            res("nerf/{cls}/validation.png"),
            caption="../report/validation.rst",
            category="NeRF validation",
            labels={"class": "{cls}"},
        ),
    log:
        res("logs/validate_checkpoint/{cls}.log"),
    benchmark:
        res("benchmarks/validate_checkpoint/{cls}.tsv")
    resources:
        **gpu_resources(),
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 20 * attempt,
    params:
        min_psnr=config["nerf"]["min_psnr"],
        min_mask_iou=config["nerf"]["min_mask_iou"],
        background=config["nerf"]["validation_background"],
        device=config["device"],
        source=lambda wc: config["classes"][wc.cls],
        seed=config["seed"],
    script:
        "../scripts/validate_checkpoint.py"
