# Neural-Sim: the pose distribution psi learned by bilevel optimization through the class NeRFs and a detector,
# steered by target/val only (target/test is never read here), and its control with the psi update off.


rule optimize_distribution:
    input:
        unpack(neuralsim_inputs),
    output:
        distribution=res("neuralsim/distribution.json"),
        trajectory=res("neuralsim/trajectory.tsv"),
        probabilities=report(
            res("neuralsim/probabilities.png"), caption="../report/neuralsim_probabilities.rst", category="Neural-Sim"
        ),
        learned_vs_target=report(
            res("neuralsim/learned_vs_target.png"),
            caption="../report/neuralsim_learned_vs_target.rst",
            category="Neural-Sim",
        ),
    log:
        res("logs/optimize_distribution/neuralsim.log"),
    benchmark:
        res("benchmarks/optimize_distribution/neuralsim.tsv")
    # the longest chain of the run (the loop, then the neuralsim detectors): started before the uniform and
    # oracle detectors that compete for the same GPU slots (on one H200 they went first and the loop waited)
    priority: 10
    threads: STAGE_THREADS
    resources:
        **gpu_resources(),
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        **neuralsim_params(True, "neuralsim"),
    script:
        "../scripts/optimize_distribution.py"


# The control: the same loop (same samples, fine-tuning and validation) with psi frozen at its start, so a gain
# of the learned run can be told apart from the extra fine-tuning its detector gets.
rule optimize_distribution_control:
    input:
        unpack(neuralsim_inputs),
    output:
        distribution=res("neuralsim_control/distribution.json"),
        trajectory=res("neuralsim_control/trajectory.tsv"),
    log:
        res("logs/optimize_distribution/neuralsim_control.log"),
    benchmark:
        res("benchmarks/optimize_distribution/neuralsim_control.tsv")
    threads: STAGE_THREADS
    resources:
        **gpu_resources(),
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    params:
        **neuralsim_params(False, "neuralsim_control"),
    script:
        "../scripts/optimize_distribution.py"


rule neuralsim_control_comparison:
    input:
        **({"target": res("target/val/distribution.json")} if TARGET_DISTRIBUTION_KNOWN else {}),
        learned=res("neuralsim/trajectory.tsv"),
        control=res("neuralsim_control/trajectory.tsv"),
        # the per-factor TV panels, where the target's pose distribution is known
    output:
        report(
            res("neuralsim/control_comparison.png"),
            caption="../report/neuralsim_control_comparison.rst",
            category="Neural-Sim",
        ),
    log:
        res("logs/neuralsim_control_comparison.log"),
    resources:
        mem_mb=lambda wc, attempt: 1000 * attempt,
        runtime=lambda wc, attempt: 5 * attempt,
    script:
        "../scripts/optimize_distribution.py"
