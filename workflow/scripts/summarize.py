"""summarize: the results table over strategies and seeds, and the report's plots."""

import logging

from instsim.io import atomic_path, read_json
from instsim.stages.report import plot_ap, plot_per_class, summary_table, write_predictions_grid
from instsim.stages.runner import run_stage

log = logging.getLogger("instsim")


def main(sm):
    table = summary_table([read_json(p) for p in sm.input.metrics])
    with atomic_path(sm.output.table) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
    log.info("summary:\n%s", table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    plot_ap(table, sm.output.ap_plot)
    plot_per_class(table, sm.output.class_plot)
    for detections, out in zip(sm.input.detections, sm.output.predictions):
        write_predictions_grid(sm.input.annotations, detections, sm.input.images, out)


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
