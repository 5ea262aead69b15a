"""The workflow end to end on the user's own world: the real Blender fixture's BlenderNeRF folders as classes
(lamp, chair), its COCO val split (the quirky export) steering Neural-Sim, its COCO test split for the evaluation,
the oracle from its distribution.json; then the same run without a known distribution (uniform + neuralsim alone)."""

import json
import shutil

import imageio.v3 as iio
import pandas as pd
import pytest

from workflow_utils import byo_config, run_snakemake, slurm_helpers

pytestmark = pytest.mark.workflow

runs = slurm_helpers("runs")

CLASSES = ["chair", "lamp"]
# the stages that learn something: none may read the held-out target/test
LEARNING_RULES = {"train_nerf", "train_detector", "optimize_distribution", "optimize_distribution_control"}


@pytest.fixture(scope="module")
def byo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("byo_run")
    # everything but Neural-Sim's control run (tests/test_workflow.py covers it): CI has two cores
    proc = run_snakemake(workdir, byo_config(), "results/eval/summary.tsv", "results/neuralsim/learned_vs_target.png",
                         "results/data/chair/intrinsics.json", "results/data/lamp/intrinsics.json", timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir


def test_no_learning_stage_reads_target_test(tmp_path):
    proc = run_snakemake(tmp_path, byo_config(), "--dry-run", "--forceall")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = runs.parse_jobs(proc.stdout + "\n" + proc.stderr)
    assert {j.rule for j in jobs} >= LEARNING_RULES | {"import_coco_target", "evaluate"}
    assert "render_target" not in {j.rule for j in jobs}
    for job in jobs:
        if job.rule in LEARNING_RULES:
            assert not [f for f in job.input if "target/test" in f], (job.rule, job.input)
    evaluate = [j for j in jobs if j.rule == "evaluate"]
    assert evaluate and all(any("target/test/annotations.json" in f for f in j.input) for j in evaluate)


def test_coco_target_imported(byo_run):
    # val is the quirky export: 16 images, one of them (source id 5) without annotation
    for split, n, objects in (("val", 16, 15), ("test", 24, 24)):
        coco = json.loads((byo_run / f"results/target/{split}/annotations.json").read_text())
        assert [c["name"] for c in coco["categories"]] == CLASSES
        assert len(coco["images"]) == n and len(coco["annotations"]) == objects
        assert all(i["transform"]["scale"] == [0.75, 0.75] for i in coco["images"])  # 64 px -> 48 px
        img = iio.imread(byo_run / f"results/target/{split}/images" / coco["images"][0]["file_name"])
        assert img.shape == (48, 48, 3)
        dist = json.loads((byo_run / f"results/target/{split}/distribution.json").read_text())
        assert dist["probabilities"]["azimuth"] == pytest.approx([0.3, 0.35, 0.25, 0.02, 0.02, 0.02, 0.02, 0.02])


def test_nerfs_of_the_blendernerf_folders_validated(byo_run):
    for cls in CLASSES:
        v = json.loads((byo_run / f"results/nerf/{cls}/validation.json").read_text())
        assert v["passed"] and v["n_views"] == 8


def test_neuralsim_steered_by_coco_val_and_all_strategies_evaluated(byo_run):
    learned = json.loads((byo_run / "results/neuralsim/distribution.json").read_text())
    assert set(learned["classes"]) == set(CLASSES)
    assert learned["neuralsim"]["tv_to_target"]["final"] is not None  # the distribution is known here
    table = pd.read_csv(byo_run / "results/eval/summary.tsv", sep="\t", dtype={"seed": str})
    assert set(table.strategy) == {"uniform", "oracle", "neuralsim"}
    assert {"AP", "AP50", "AP_chair", "AP_lamp"} <= set(table.columns)
    for strategy in ("uniform", "oracle", "neuralsim"):
        ev = json.loads((byo_run / f"results/eval/{strategy}/seed_0.json").read_text())
        assert ev["num_images"] == 24 and ev["num_annotations"] == 24


def test_without_a_known_distribution_uniform_and_neuralsim_alone(byo_run, tmp_path):
    """No target.distribution_file: no distribution.json, no oracle; Neural-Sim's TV columns empty, the summary and
    the plots still made. The NeRFs of the first run are reused (their inputs did not change)."""
    for part in ("data", "nerf"):
        shutil.copytree(byo_run / "results" / part, tmp_path / "results" / part, symlinks=True)
    cfg = byo_config()
    cfg["target"].pop("distribution_file")
    cfg["strategies"] = ["uniform", "neuralsim"]
    proc = run_snakemake(tmp_path, cfg, "results/eval/summary.tsv", "results/neuralsim/learned_vs_target.png",
                         timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "train_nerf" not in {j.rule for j in runs.parse_jobs(out)}
    for split in ("val", "test"):
        assert not (tmp_path / f"results/target/{split}/distribution.json").exists()
    learned = json.loads((tmp_path / "results/neuralsim/distribution.json").read_text())
    assert learned["neuralsim"]["tv_to_target"] == {"initial": None, "final": None}
    assert learned["neuralsim"]["tv_to_target_per_factor"] is None
    trajectory = pd.read_csv(tmp_path / "results/neuralsim/trajectory.tsv", sep="\t")
    assert trajectory["tv_to_target"].isna().all() and trajectory["val_loss"].notna().all()
    table = pd.read_csv(tmp_path / "results/eval/summary.tsv", sep="\t", dtype={"seed": str})
    assert set(table.strategy) == {"uniform", "neuralsim"}
    for name in ("ap_per_strategy.png", "per_class_ap.png", "predictions_neuralsim.png"):
        assert (tmp_path / "results/eval" / name).stat().st_size > 1000
