"""The workflow end to end on configs/tiny.yaml, run in a scratch folder, plus bad-config handling."""

import json

import imageio.v3 as iio
import pandas as pd
import pytest

from conftest import BLENDERNERF_TINY
from instsim.transforms import read_transforms
from workflow_utils import run_snakemake, slurm_helpers, tiny_config

pytestmark = pytest.mark.workflow

runs = slurm_helpers("runs")

# The rules that ask for a GPU when the run uses CUDA (workflow/rules/common.smk: gpu_resources()).
GPU_RULES = {"train_nerf", "validate_checkpoint", "train_detector", "optimize_distribution",
             "optimize_distribution_control"}

CLASSES = ["fist", "yeah", "palm"]


# `tiny_run` (a finished run of the tiny config, shared with other modules) comes from conftest.py.


def test_datasets_in_blendernerf_format(tiny_run):
    cfg = tiny_config()
    for cls in CLASSES:
        for split in ("train", "val", "test"):
            tf = read_transforms(tiny_run / f"results/data/{cls}/transforms_{split}.json")
            assert len(tf.frames) == cfg["dataset"]["views"][split]
            img = iio.imread(tf.frames[0].image_path)
            assert img.shape == (48, 48, 4)  # RGBA
            assert 0 < (img[..., 3] > 0).mean() < 0.8  # object present, not cut
            assert (img[0, :, 3] == 0).all() and (img[:, -1, 3] == 0).all()


def test_intrinsics_json(tiny_run):
    for cls in CLASSES:
        info = json.loads((tiny_run / f"results/data/{cls}/intrinsics.json").read_text())
        assert info["w"] == info["h"] == 48
        assert info["radius"]["mean"] == pytest.approx(3.0, abs=1e-3)
        assert 0.5 < info["scene"]["bound"] < 1.5
        for key in ("fl_x", "fl_y", "cx", "cy", "centre"):
            assert key in info


def test_target_domain_coco(tiny_run):
    for split, n in (("val", 12), ("test", 24)):
        coco = json.loads((tiny_run / f"results/target/{split}/annotations.json").read_text())
        assert [c["name"] for c in coco["categories"]] == sorted(CLASSES)
        assert len(coco["images"]) == n and len(coco["annotations"]) == n
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w > 2 and h > 2 and x >= 0 and y >= 0 and x + w <= 48 and y + h <= 48
        img = iio.imread(tiny_run / f"results/target/{split}/images" / coco["images"][0]["file_name"])
        assert img.shape == (48, 48, 3)
        dist = json.loads((tiny_run / f"results/target/{split}/distribution.json").read_text())
        assert dist["probabilities"]["azimuth"] == tiny_config()["target"]["distribution"]["azimuth"]


def test_val_and_test_differ(tiny_run):
    val = iio.imread(tiny_run / "results/target/val/images/00000.png")
    test = iio.imread(tiny_run / "results/target/test/images/00000.png")
    assert (val != test).any()


def test_second_run_has_nothing_to_do(tiny_run):
    proc = run_snakemake(tiny_run, None, "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_folder_class_imports_blendernerf(tmp_path):
    classes = {"fist": {"source": "procedural", "gesture": "fist"}, "shapes": {"source": "folder", "path": str(BLENDERNERF_TINY)}}
    proc = run_snakemake(
        tmp_path, tiny_config(classes=classes), "results/nerf/shapes/validation.json", "results/target/test/annotations.json"
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    data = tmp_path / "results/data/shapes"
    train, val = read_transforms(data / "transforms_train.json"), read_transforms(data / "transforms_val.json")
    test = read_transforms(data / "transforms_test.json")
    assert len(train.frames) + len(val.frames) == 30 and len(val.frames) >= 1 and len(test.frames) == 8
    assert (data / "train" / "0001.png").is_symlink()  # linked, not copied
    info = json.loads((data / "intrinsics.json").read_text())
    assert info["fl_x"] == pytest.approx(88.889, abs=1e-3) and info["scene"]["aabb_scale"] == 4.0
    coco = json.loads((tmp_path / "results/target/test/annotations.json").read_text())
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2}
    validation = json.loads((tmp_path / "results/nerf/shapes/validation.json").read_text())
    assert validation["passed"] and validation["n_views"] == 8 and "convention_check" not in validation


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"dataset": {**tiny_config()["dataset"], "radius": "far"}}, "dataset.radius: 'far' is not of type 'number'"),
        ({"classes": {"fist": {"source": "procedural", "gesture": "wave"}}}, "classes.fist.gesture: 'wave' is not one of"),
        ({"classes": {"cup": {"source": "teapot"}}}, "classes.cup.source"),
        ({"classes": {"mug": {"source": "folder", "path": "/nonexistent/mug"}}}, "classes.mug.path"),
        ({"target": {**tiny_config()["target"], "distribution": {"azimuth": [1.0], "elevation": [0.2, 0.3, 0.5], "zoom": [0.2, 0.3, 0.5]}}}, "target.distribution.azimuth"),
        ({"pose_space": {**tiny_config()["pose_space"], "zoom": {"bins": 3, "low": 0.0, "high": 4.4}}}, "pose_space.zoom.low"),
        ({"seeds": []}, "seeds"),
        # a camera distance in world units (configs before zoom became relative to the training cameras)
        ({"pose_space": {**tiny_config()["pose_space"], "zoom": {"bins": 3, "low": 2.6, "high": 4.4}}}, "pose_space.zoom.high"),
        ({"extra_key": 1}, "Additional properties are not allowed ('extra_key'"),
        ({"nerf": {**tiny_config()["nerf"], "hash_size": 3}}, "nerf.hash_size"),
        ({"nerf": {**tiny_config()["nerf"], "preset": "huge"}}, "nerf.preset: 'huge' is not one of"),
        ({"detector": {"images_per_class": 4, "settings": {"depth": 3}}}, "detector.depth"),
        ({"strategies": ["uniform", "random"]}, "strategies.1: 'random' is not one of"),
        ({"gpu_model": "a100 80gb"}, "gpu_model: 'a100 80gb' does not match"),
    ],
)
def test_bad_config_fails_clearly_without_outputs(tmp_path, override, expected):
    proc = run_snakemake(tmp_path, tiny_config(**override))
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-3000:]
    assert not (tmp_path / "results" / "data").exists()


@pytest.mark.parametrize(
    "device, gpu_model, gpu, model",
    [("cuda", "h100", "1", "h100"), ("cuda", None, "1", None), ("cpu", "h100", "0", None)],
    ids=["cuda-with-model", "cuda-no-model", "cpu-ignores-model"],
)
def test_gpu_stages_ask_for_the_configured_gpu_model(tmp_path, device, gpu_model, gpu, model):
    """Every GPU stage asks for `gpu` (1 with CUDA) and for `gpu_model` only when the config names one and a
    GPU is asked for; no other stage asks for either. Read from the resources a dry run prints."""
    overrides = {"device": device, **({"gpu_model": gpu_model} if gpu_model else {})}
    proc = run_snakemake(tmp_path, tiny_config(**overrides), "--dry-run", "--forceall")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = runs.parse_jobs(proc.stdout + "\n" + proc.stderr)
    assert GPU_RULES <= {j.rule for j in jobs}
    for job in jobs:
        resources = dict(kv.split("=", 1) for kv in job.resources.split(", ") if kv)
        if job.rule in GPU_RULES:
            assert resources.get("gpu") == gpu and resources.get("gpu_model") == model, (job.rule, resources)
        else:
            assert "gpu" not in resources and "gpu_model" not in resources, (job.rule, resources)


def test_bad_folder_dataset_fails_the_rule_clearly(tmp_path, blendernerf_copy):
    img = blendernerf_copy / "train" / "0005.png"
    img.write_bytes(img.read_bytes()[:200])
    classes = {"shapes": {"source": "folder", "path": str(blendernerf_copy)}}
    proc = run_snakemake(tmp_path, tiny_config(classes=classes), "results/data/shapes/intrinsics.json")
    assert proc.returncode != 0
    out = proc.stderr + proc.stdout
    assert "transforms_train.json" in out and "frames[4].file_path" in out and "0005.png" in out
    assert not (tmp_path / "results/data/shapes/transforms_train.json").exists()
    assert not (tmp_path / "results/data/shapes/intrinsics.json").exists()


def test_nerfs_validated(tiny_run):
    for cls in CLASSES:
        v = json.loads((tiny_run / f"results/nerf/{cls}/validation.json").read_text())
        assert v["passed"] and v["psnr"] >= tiny_config()["nerf"]["min_psnr"]
        assert v["background"] == [1.0, 1.0, 1.0] and len(v["per_view"]) == 3
        assert len(v["convention_check"]["iou"]) == 5
        assert (tiny_run / f"results/nerf/{cls}/validation.png").is_file()
        log = (tiny_run / f"results/nerf/{cls}/train_log.tsv").read_text().splitlines()
        assert log[0].split("\t")[:2] == ["step", "loss"] and len(log) > 2
        assert not (tiny_run / f"results/nerf/{cls}/resume").exists()


def test_summary_compares_strategies(tiny_run):
    table = pd.read_csv(tiny_run / "results/eval/summary.tsv", sep="\t", dtype={"seed": str})
    assert set(table.strategy) == set(tiny_config()["strategies"])
    assert {"AP", "AP50", "AP75", "AP_fist", "AP_palm", "AP_yeah"} <= set(table.columns)
    assert set(table.seed) == {"0", "mean", "std"}
    for name in ("ap_per_strategy.png", "per_class_ap.png", "predictions_uniform.png"):
        assert (tiny_run / "results/eval" / name).stat().st_size > 1000
