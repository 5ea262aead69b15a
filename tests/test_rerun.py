"""Rerunning one stage: `--forcerun render_target` reruns every render_target job and exactly the jobs that
depend on their files (found from the workflow's job graph, not from Snakemake's rerun decision); every other
file under results/ keeps its modification time."""

import shutil
from pathlib import Path

import pytest

from workflow_utils import run_snakemake, slurm_helpers, tiny_config


runs = slurm_helpers("runs")

pytestmark = pytest.mark.workflow

STAGE = "render_target"


@pytest.fixture(scope="module")
def finished_run(tiny_run, tmp_path_factory) -> Path:
    """A copy (modification times kept) of the session's finished local tiny run, free to change."""
    dst = tmp_path_factory.mktemp("rerun") / "run"
    shutil.copytree(tiny_run, dst, symlinks=True)
    return dst


def test_forcerun_reruns_only_the_stage_and_its_dependants(finished_run):
    workdir = finished_run
    config = tiny_config()
    proc = run_snakemake(workdir, config, "-n")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    plan = runs.planned_jobs(workdir, workdir / "test_config.yaml")
    forced = [j for j in plan if j.rule == STAGE]
    assert len(forced) == len(config["target"]["images"]), [j.key for j in forced]  # one job per target split
    expected = runs.dependants(plan, forced)
    untouched_jobs = [j for j in plan if j.key not in {e.key for e in expected}]
    assert untouched_jobs, "every job depends on render_target: the test would not show anything"

    before = runs.result_files(workdir)
    proc = run_snakemake(workdir, config, "--forcerun", STAGE)
    out = proc.stdout + "\n" + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    after = runs.result_files(workdir)

    ran = runs.parse_jobs(out)
    assert sorted(j.key for j in ran) == sorted(j.key for j in expected), (
        f"ran: {sorted(j.key for j in ran)}\nexpected (render_target and its dependants): {sorted(j.key for j in expected)}"
    )

    rewritten = runs.files_of(expected, workdir)
    assert set(after) == set(before), sorted(set(after) ^ set(before))
    changed = {f for f in after if after[f] != before[f]}
    assert changed == rewritten, (
        f"changed but not written by a rerun job: {sorted(changed - rewritten)}\n"
        f"written by a rerun job but unchanged: {sorted(rewritten - changed)}"
    )
    # The stage's own outputs are among them, and something upstream (the datasets, the NeRFs) is not.
    assert {"results/target/val/annotations.json", "results/target/test/annotations.json"} <= changed
    assert "results/data/fist/transforms_train.json" in set(after) - changed
