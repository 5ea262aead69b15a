# Detectors trained on NeRF renders per strategy and seed, evaluated on the held-out target test split.


rule train_detector:
    input:
        unpack(detector_inputs),
    output:
        model=res("detector/{strategy}/seed_{seed}/model.pt"),
        train_log=res("detector/{strategy}/seed_{seed}/train_log.tsv"),
        samples=res("detector/{strategy}/seed_{seed}/train_samples.png"),
    log:
        res("logs/train_detector/{strategy}/seed_{seed}.log"),
    benchmark:
        res("benchmarks/train_detector/{strategy}/seed_{seed}.tsv")
    threads: DETECTOR_THREADS
    resources:
        **gpu_resources(),
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    params:
        classes=CLASSES,
        pose_space=config["pose_space"],
        target=config["target"],
        detector=config["detector"],
        device=config["device"],
        run_seed=config["seed"],
        resume=lambda wc: res(f"detector/{wc.strategy}/seed_{wc.seed}/resume/state.pt"),
    script:
        "../scripts/train_detector.py"


rule evaluate:
    input:
        model=res("detector/{strategy}/seed_{seed}/model.pt"),
        annotations=res("target/test/annotations.json"),
        images=res("target/test/images"),
    output:
        metrics=res("eval/{strategy}/seed_{seed}.json"),
        detections=res("eval/{strategy}/seed_{seed}_detections.json"),
    log:
        res("logs/evaluate/{strategy}/seed_{seed}.log"),
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    script:
        "../scripts/evaluate.py"


rule summarize:
    input:
        metrics=expand(res("eval/{strategy}/seed_{seed}.json"), strategy=STRATEGIES, seed=SEEDS),
        detections=expand(res("eval/{strategy}/seed_{seed}_detections.json"), strategy=STRATEGIES, seed=SEEDS[0]),
        annotations=res("target/test/annotations.json"),
        images=res("target/test/images"),
    output:
        table=report(res("eval/summary.tsv"), caption="../report/summary.rst", category="Detection"),
        ap_plot=report(res("eval/ap_per_strategy.png"), caption="../report/ap_plot.rst", category="Detection"),
        class_plot=report(res("eval/per_class_ap.png"), caption="../report/class_plot.rst", category="Detection"),
        predictions=report(
            expand(res("eval/predictions_{strategy}.png"), strategy=STRATEGIES),
            caption="../report/predictions.rst",
            category="Detection",
        ),
    log:
        res("logs/summarize.log"),
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    params:
        strategies=STRATEGIES,
    script:
        "../scripts/summarize.py"
