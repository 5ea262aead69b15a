"""The catalogue of bad inputs: every case breaks one thing, runs the stage that meets it, and says what the
user must be told.

A :class:`Case` sets up its broken input under a scratch folder and runs its entry point:

* ``stage``: the real ``workflow/scripts/<rule>.py`` in-process with a fake ``snakemake`` object
  (:mod:`reliability_stage`), so :func:`instsim.stages.runner.run_stage` turns the error into its exit status and log;
* ``library``: a library entry point wrapped in :func:`instsim.stages.runner.run_stage`, for stages whose script
  needs far more set-up than the fault (the detector's training data come from NeRF renders);
* ``snakemake``: a real ``snakemake`` process on ``configs/tiny.yaml`` with one key changed, where Snakemake's
  own behaviour is the point (config validation before any job, a failed job's outputs removed).

Every case must end with a non-zero exit, a message holding each of its ``expect`` fragments (the file and
the field or value at fault) and none of its outputs on disk. ``docs/reliability.md`` has a row per case
(and per fault and determinism check); ``test_reliability_table.py`` keeps the two in step. Run this file to
print the table rows of the catalogue.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

if __name__ == "__main__":  # run as a script: the checkout, tests/ and this folder, as pytest sets them up
    sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (2, 1, 0)]

from conftest import BLENDER_COCO_TINY, BLENDERNERF_TINY
from instsim.detect import DetectorConfig, build_detector, make_shapes_dataset, save_detector, train_detector
from instsim.io import save_torch, write_json, write_png
from instsim.nerf.config import NerfConfig
from instsim.nerf.train import train_nerf
from instsim.neuralsim.config import NeuralSimConfig
from instsim.neuralsim.resume import CHECKPOINT_FORMAT
from instsim.stages.intrinsics import extract_intrinsics
from instsim.stages.runner import run_stage
from instsim.transforms import load_views
from reliability_stage import FakeSnakemake, Named, close_stage_log, run_stage_script, stage_job
from workflow_utils import byo_config, run_snakemake, tiny_config

SPLITS = ("train", "val", "test")


@dataclass
class Outcome:
    """How an entry point ended: exit status, everything it said (log, stderr), outputs it must not leave."""

    exit_code: int
    message: str
    outputs: list[Path]


@dataclass(frozen=True)
class Case:
    """One bad input.

    id: short stable name (the row key in ``docs/reliability.md``).
    broken: what is wrong, in words.
    stage: the rule (or library function) that meets it; ``entry`` how it is run (see the module docstring).
    expect: fragments the message must contain: the file, then the field or the value at fault.
    run: sets the case up under the given scratch folder and runs it.
    """

    id: str
    broken: str
    stage: str
    entry: str
    expect: tuple[str, ...]
    run: Callable[[Path], Outcome]


# ---------------------------------------------------------------------------------------------------------
# generate_dataset on a folder class: a copy of the real BlenderNeRF dataset, damaged
# ---------------------------------------------------------------------------------------------------------


def _dataset_job(tmp: Path, source: dict) -> FakeSnakemake:
    out = tmp / "results" / "data" / "shapes"
    return stage_job(
        "generate_dataset", tmp / "results",
        output={"transforms": [out / f"transforms_{s}.json" for s in SPLITS], "views": [out / s for s in SPLITS]},
        params={"source": source, "dataset": tiny_config()["dataset"], "seed": 0, "device": "cpu"},
        wildcards={"cls": "shapes"},
    )


def _run_job(script: str, sm: FakeSnakemake) -> Outcome:
    res = run_stage_script(script, sm)
    return Outcome(res.exit_code, res.log, res.outputs)


def _folder_case(damage: Callable[[Path], None]) -> Callable[[Path], Outcome]:
    """Copy the BlenderNeRF fixture, apply ``damage`` to the copy, import it with ``generate_dataset``."""

    def run(tmp: Path) -> Outcome:
        src = tmp / "blendernerf"
        shutil.copytree(BLENDERNERF_TINY, src)
        damage(src)
        return _run_job("generate_dataset", _dataset_job(tmp, {"source": "folder", "path": str(src)}))

    return run


def _edit_json(split: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / f"transforms_{split}.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))

    return damage


def _truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return damage


def _overwrite(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / rel).write_bytes(data)


def _set(path: tuple, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        obj = meta
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return edit


def _delete(path: tuple) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        obj = meta
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return edit


def _missing_folder(tmp: Path) -> Outcome:
    return _run_job("generate_dataset", _dataset_job(tmp, {"source": "folder", "path": str(tmp / "no_such_dataset")}))


# ---------------------------------------------------------------------------------------------------------
# NeRF stages: a one-step NeRF of the BlenderNeRF fixture is enough to exercise loading and resuming
# ---------------------------------------------------------------------------------------------------------


def _intrinsics(tmp: Path) -> Path:
    path = tmp / "results" / "data" / "shapes" / "intrinsics.json"
    write_json(path, extract_intrinsics(BLENDERNERF_TINY / "transforms_train.json"))
    return path


def _one_step_nerf(path: Path, **settings) -> None:
    """A NeRF checkpoint of the fixture after one training step (finished: ``steps=1``)."""
    cfg = NerfConfig.cpu(**{"steps": 1, "threads": 1, **settings})
    info = extract_intrinsics(BLENDERNERF_TINY / "transforms_train.json")
    train_nerf(load_views(BLENDERNERF_TINY / "transforms_train.json"), info, cfg, path, path.with_suffix(".tsv"),
               progress=False)


def train_nerf_job(tmp: Path, **overrides) -> FakeSnakemake:
    """A ``train_nerf`` job on the BlenderNeRF fixture under ``tmp/results`` (NeRF overrides: default 4 steps)."""
    nerf = tmp / "results" / "nerf" / "shapes"
    overrides = {"steps": 4, "checkpoint_every": 2, **overrides}
    return stage_job(
        "train_nerf", tmp / "results",
        input={"transforms": BLENDERNERF_TINY / "transforms_train.json", "intrinsics": _intrinsics(tmp)},
        output={"checkpoint": nerf / "checkpoint.pt", "train_log": nerf / "train_log.tsv"},
        params={"nerf": {"preset": "cpu", "overrides": overrides, "device": "cpu", "seed": 0},
                "resume": nerf / "resume" / "state.pt"},
        wildcards={"cls": "shapes"},
    )


def _nerf_resume_other_config(tmp: Path) -> Outcome:
    sm = train_nerf_job(tmp)
    _one_step_nerf(Path(sm.params.resume), log2_table=12, steps=4)
    return _run_job("train_nerf", sm)


def _validate_job(tmp: Path, damage: Callable[[Path, Path], None]) -> Outcome:
    nerf = tmp / "results" / "nerf" / "shapes"
    ckpt = nerf / "checkpoint.pt"
    _one_step_nerf(ckpt)
    info = _intrinsics(tmp)
    damage(ckpt, info)
    sm = stage_job(
        "validate_checkpoint", tmp / "results",
        input={"checkpoint": ckpt, "transforms": BLENDERNERF_TINY / "transforms_test.json", "intrinsics": info},
        output={"metrics": nerf / "validation.json", "comparison": nerf / "validation.png"},
        params={"min_psnr": 0.0, "min_mask_iou": 0.0, "background": "white", "device": "cpu",
                "source": {"source": "folder", "path": str(BLENDERNERF_TINY)}, "seed": 0},
        wildcards={"cls": "shapes"},
    )
    return _run_job("validate_checkpoint", sm)


def _other_scene_bound(ckpt: Path, info: Path) -> None:
    # the dataset (so its intrinsics.json) changed after the NeRF was trained: another scene bound
    meta = json.loads(info.read_text())
    meta["scene"]["bound"] = 2.5
    info.write_text(json.dumps(meta))


def _truncate_file(ckpt: Path, info: Path) -> None:
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])


def _future_format(ckpt: Path, info: Path) -> None:
    state = torch.load(ckpt, weights_only=True)
    state["format_version"] = 99
    torch.save(state, ckpt)


# ---------------------------------------------------------------------------------------------------------
# evaluate: a tiny untrained detector and a two-image COCO target set
# ---------------------------------------------------------------------------------------------------------

_DETECTOR = dict(image_size=32, num_classes=2, width=4, head_width=4, dilations=(1,), batch_size=4, steps=6,
                 warmup_steps=1, checkpoint_every=2)


def _coco_set(folder: Path) -> tuple[Path, Path]:
    """Two 32x32 RGB images and their COCO ground truth (one box each)."""
    images = folder / "images"
    for i in range(2):
        write_png(images / f"{i:05d}.png", np.full((32, 32, 3), 0.2 + 0.3 * i, np.float32))
    coco = {
        "images": [{"id": i, "file_name": f"{i:05d}.png", "width": 32, "height": 32} for i in range(2)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [{"id": i + 1, "image_id": i, "category_id": 1 + i, "bbox": [4, 4, 10, 12]} for i in range(2)],
    }
    write_json(folder / "annotations.json", coco)
    return folder / "annotations.json", images


def _evaluate_case(damage: Callable[[Path, Path, Path], None]) -> Callable[[Path], Outcome]:
    def run(tmp: Path) -> Outcome:
        results = tmp / "results"
        model = results / "detector" / "uniform" / "seed_0" / "model.pt"
        save_detector(build_detector(DetectorConfig(**_DETECTOR)), model)
        annotations, images = _coco_set(results / "target" / "test")
        damage(model, annotations, images)
        sm = stage_job(
            "evaluate", results, input={"model": model, "annotations": annotations, "images": images},
            output={"metrics": results / "eval" / "uniform" / "seed_0.json",
                    "detections": results / "eval" / "uniform" / "seed_0_detections.json"},
            wildcards={"strategy": "uniform", "seed": "0"},
        )
        return _run_job("evaluate", sm)

    return run


def _edit_coco(edit: Callable[[dict], None]) -> Callable[[Path, Path, Path], None]:
    def damage(model: Path, annotations: Path, images: Path) -> None:
        coco = json.loads(annotations.read_text())
        edit(coco)
        annotations.write_text(json.dumps(coco))

    return damage


def _foreign_detector(model: Path, annotations: Path, images: Path) -> None:
    state = torch.load(model, weights_only=True)
    state["format"] = "instsim-detector-v0"
    torch.save(state, model)


def _library(tmp: Path, rule: str, body: Callable[[], None], outputs: list[Path]) -> Outcome:
    """Run ``body`` the way a stage script does (:func:`instsim.stages.runner.run_stage`): exit 1 on InstsimError."""
    sm = FakeSnakemake(rule=rule, log=Named(tmp / "logs" / f"{rule}.log"), output=Named(*outputs))
    code = 0
    try:
        run_stage(sm, lambda _: body())
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        close_stage_log()
    return Outcome(code, Path(sm.log[0]).read_text(), outputs)


def _detector_resume_other_config(tmp: Path) -> Outcome:
    images, boxes, labels = make_shapes_dataset(8, image_size=32, min_size=6, max_size=14, seed=5)
    state = tmp / "detector" / "resume" / "state.pt"
    settings = {**_DETECTOR, "num_classes": 3}  # the shapes dataset has three classes
    train_detector(images, boxes, labels, DetectorConfig(**settings), checkpoint_path=state, max_steps=2, progress=False)
    final = tmp / "detector" / "model.pt"

    def body() -> None:
        model = train_detector(images, boxes, labels, DetectorConfig(**{**settings, "lr": 1e-3}),
                               checkpoint_path=state, progress=False)
        save_detector(model, final)

    return _library(tmp, "train_detector", body, [final])


# ---------------------------------------------------------------------------------------------------------
# optimize_distribution: one-step NeRF, a 48 px target/val set, the target distribution
# ---------------------------------------------------------------------------------------------------------


def _neuralsim_case(damage: Callable[[Path, Path], None]) -> Callable[[Path], Outcome]:
    def run(tmp: Path) -> Outcome:
        cfg = tiny_config()
        results = tmp / "results"
        ckpt = results / "nerf" / "shapes" / "checkpoint.pt"
        _one_step_nerf(ckpt)
        val = results / "target" / "val"
        for i in range(2):
            write_png(val / "images" / f"{i:05d}.png", np.full((48, 48, 3), 0.5, np.float32))
        write_json(val / "annotations.json", {
            "images": [{"id": i, "file_name": f"{i:05d}.png", "width": 48, "height": 48} for i in range(2)],
            "categories": [{"id": 1, "name": "shapes"}],
            "annotations": [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20]} for i in range(2)],
        })
        write_json(val / "distribution.json", {"probabilities": cfg["target"]["distribution"]})
        resume = results / "neuralsim" / "resume" / "state.pt"
        damage(val / "distribution.json", resume)
        out = results / "neuralsim"
        sm = stage_job(
            "optimize_distribution", results,
            input={"checkpoints": [ckpt], "validations": [], "intrinsics": [_intrinsics(tmp)],
                   "annotations": val / "annotations.json", "images": val / "images",
                   "distribution": val / "distribution.json"},
            output={"distribution": out / "distribution.json", "trajectory": out / "trajectory.tsv",
                    "probabilities": out / "probabilities.png", "learned_vs_target": out / "learned_vs_target.png"},
            params={"classes": ["shapes"], "pose_space": cfg["pose_space"], "target": cfg["target"],
                    "detector": cfg["detector"], "neuralsim": cfg["neuralsim"], "device": "cpu", "run_seed": 0,
                    "update_psi": True, "resume": resume},
        )
        return _run_job("optimize_distribution", sm)

    return run


def _no_probabilities(distribution: Path, resume: Path) -> None:
    distribution.write_text(json.dumps({"azimuth": [0.125] * 8}))


def _resume_of_other_settings(distribution: Path, resume: Path) -> None:
    # what a run with 5 iterations instead of tiny's 3 left behind (the loop checks the config first)
    other = NeuralSimConfig.from_dict({**tiny_config()["neuralsim"], "iterations": 5, "seed": 0})
    save_torch({"format": CHECKPOINT_FORMAT, "config": other.to_dict(), "iteration": 2}, resume)


def _truncated_resume(distribution: Path, resume: Path) -> None:
    save_torch({"format": CHECKPOINT_FORMAT, "rows": [0.0] * 1000}, resume)
    resume.write_bytes(resume.read_bytes()[:300])


# ---------------------------------------------------------------------------------------------------------
# import_coco_target: a copy of the real fixture's COCO val split (made in Blender), damaged
# ---------------------------------------------------------------------------------------------------------


def _coco_import_case(damage: Callable[[Path], None]) -> Callable[[Path], Outcome]:
    """Copy the fixture's target/val (annotations.json, images/, distribution.json), ``damage`` the copy, import
    it with the ``import_coco_target`` stage as the byo config would."""

    def run(tmp: Path) -> Outcome:
        src = tmp / "coco_val"
        shutil.copytree(BLENDER_COCO_TINY / "target" / "val", src)
        # the oracle's distribution in instsim's relative zoom (DERIVED.md), beside the split
        shutil.copyfile(BLENDER_COCO_TINY / "target" / "distribution_relative_zoom.json", src / "distribution.json")
        damage(src)
        cfg = byo_config(val=str(src), distribution_file=str(src / "distribution.json"))
        out = tmp / "results" / "target" / "val"
        sm = stage_job(
            "import_coco_target", tmp / "results",
            input={"annotations": src / "annotations.json", "distribution": src / "distribution.json"},
            output={"images": out / "images", "annotations": out / "annotations.json",
                    "distribution": out / "distribution.json"},
            params={"classes": list(cfg["classes"]), "pose_space": cfg["pose_space"], "target": cfg["target"]},
            wildcards={"tsplit": "val"},
        )
        return _run_job("import_coco_target", sm)

    return run


def _coco_edit(edit: Callable[[dict], None], name: str = "annotations.json") -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return damage


def _append(path: tuple, value: Callable[[dict], object]) -> Callable[[dict], None]:
    """Append ``value(data)`` to the list at ``path`` (a copy of an entry, say)."""

    def edit(data: dict) -> None:
        obj = data
        for key in path:
            obj = obj[key]
        obj.append(value(data))

    return edit


def _coco_snakemake(change: Callable[[dict], None]) -> Callable[[Path], Outcome]:
    """A dry run of the byo config (the fixture's COCO target) with one change."""

    def run(tmp: Path) -> Outcome:
        cfg = byo_config()
        change(cfg)
        proc = run_snakemake(tmp, cfg, "-n", timeout=120)
        return Outcome(proc.returncode, proc.stdout + proc.stderr, [tmp / "results"])

    return run


# ---------------------------------------------------------------------------------------------------------
# Snakemake on the tiny config with one key changed
# ---------------------------------------------------------------------------------------------------------


def _snakemake_config(change: Callable[[dict], None]) -> Callable[[Path], Outcome]:
    """A dry run (``-n``): config validation happens before any job is planned."""

    def run(tmp: Path) -> Outcome:
        cfg = tiny_config()
        change(cfg)
        proc = run_snakemake(tmp, cfg, "-n", timeout=120)
        return Outcome(proc.returncode, proc.stdout + proc.stderr, [tmp / "results"])

    return run


def _snakemake_folder_json_truncated(tmp: Path) -> Outcome:
    src = tmp / "blendernerf"
    shutil.copytree(BLENDERNERF_TINY, src)
    _truncate("transforms_train.json", 0.3)(src)
    data = tmp / "results" / "data" / "shapes"
    proc = run_snakemake(tmp, tiny_config(classes={"shapes": {"source": "folder", "path": str(src)}}),
                         "results/data/shapes/intrinsics.json", timeout=300)
    outputs = [data / f"transforms_{s}.json" for s in SPLITS] + [data / s for s in SPLITS] + [data / "intrinsics.json"]
    return Outcome(proc.returncode, proc.stdout + proc.stderr, outputs)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CASES: list[Case] = [
    # -- datasets (BlenderNeRF folder class)
    Case("png-truncated", "a training PNG cut to half its bytes", "generate_dataset", "stage",
         ("transforms_train.json", "frames[4].file_path", "0005.png"), _folder_case(_truncate("train/0005.png"))),
    Case("png-not-an-image", "a training PNG replaced by text", "generate_dataset", "stage",
         ("transforms_train.json", "frames[2].file_path", "0003.png"),
         _folder_case(_overwrite("train/0003.png", b"this is not an image\n"))),
    Case("png-header-only", "a training PNG holding only the 8-byte PNG signature", "generate_dataset", "stage",
         ("transforms_train.json", "frames[0].file_path", "0001.png"), _folder_case(_overwrite("train/0001.png", _PNG_MAGIC))),
    Case("image-missing", "a frame's file_path names an image that is not there", "generate_dataset", "stage",
         ("transforms_train.json", "frames[3].file_path", "train/gone.png"),
         _folder_case(_edit_json("train", _set(("frames", 3, "file_path"), "train/gone.png")))),
    Case("json-truncated", "transforms_train.json cut to 30% of its bytes", "generate_dataset", "stage",
         ("transforms_train.json", "not valid JSON", "line"), _folder_case(_truncate("transforms_train.json", 0.3))),
    Case("frames-missing", "transforms_test.json without its `frames` field", "generate_dataset", "stage",
         ("transforms_test.json", "'frames'", "missing"), _folder_case(_edit_json("test", _delete(("frames",))))),
    Case("frames-empty", "an empty frame list", "generate_dataset", "stage",
         ("transforms_train.json", "'frames'", "empty"), _folder_case(_edit_json("train", _set(("frames",), [])))),
    Case("pose-missing", "a frame without transform_matrix", "generate_dataset", "stage",
         ("transforms_train.json", "frames[0].transform_matrix", "missing"),
         _folder_case(_edit_json("train", _delete(("frames", 0, "transform_matrix"))))),
    Case("pose-nan", "a NaN in a camera pose", "generate_dataset", "stage",
         ("transforms_train.json", "frames[1].transform_matrix", "NaN"),
         _folder_case(_edit_json("train", _set(("frames", 1, "transform_matrix", 1, 3), float("nan"))))),
    Case("pose-non-rigid", "a pose whose rotation is scaled by 2 (not rigid)", "generate_dataset", "stage",
         ("transforms_train.json", "frames[2].transform_matrix", "rigid"),
         _folder_case(_edit_json("train", _set(("frames", 2, "transform_matrix", 0, 0), 2.0)))),
    Case("pose-not-4x4", "a 3x4 pose matrix", "generate_dataset", "stage",
         ("transforms_train.json", "frames[0].transform_matrix", "4x4"),
         _folder_case(_edit_json("train", _set(("frames", 0, "transform_matrix"), [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3]])))),
    Case("image-size-mismatch", "`w`/`h` say 32x32, the images are 64x64", "generate_dataset", "stage",
         ("transforms_train.json", "frames[0].file_path", "w x h is 32x32"),
         _folder_case(_edit_json("train", lambda m: m.update(w=32, h=32, cx=16.0, cy=16.0)))),
    Case("frames-mixed-cameras", "one frame carries its own, different focal length", "generate_dataset", "stage",
         ("transforms_train.json", "frames[5].fl_x", "different cameras"),
         _folder_case(_edit_json("train", _set(("frames", 5, "fl_x"), 50.0)))),
    Case("split-camera-differs", "transforms_test.json has another camera than train", "generate_dataset", "stage",
         ("transforms_test.json", "'fl_x'", "camera differs"),
         _folder_case(_edit_json("test", lambda m: m.update(fl_x=44.0, fl_y=44.0)))),
    Case("focal-missing", "no fl_x/fl_y and no camera_angle_x", "generate_dataset", "stage",
         ("transforms_train.json", "'fl_x'", "missing"),
         _folder_case(_edit_json("train", lambda m: [m.pop(k, None) for k in ("fl_x", "fl_y", "camera_angle_x", "camera_angle_y")]))),
    Case("folder-missing", "a folder class whose path does not exist (stage run directly)", "generate_dataset", "stage",
         ("no_such_dataset", "'path'", "does not exist"), _missing_folder),
    # -- NeRF checkpoints
    Case("nerf-resume-other-config", "train_nerf's resume state was written with log2_table 12", "train_nerf", "stage",
         ("resume/state.pt", "log2_table: checkpoint 12, expected 15", "cannot resume"), _nerf_resume_other_config),
    Case("nerf-checkpoint-other-scene", "a NeRF checkpoint trained before the scene bound changed", "validate_checkpoint",
         "stage", ("checkpoint.pt", "normalization.bound", "expected 2.5"), lambda t: _validate_job(t, _other_scene_bound)),
    Case("nerf-checkpoint-truncated", "a NeRF checkpoint cut to half its bytes", "validate_checkpoint", "stage",
         ("checkpoint.pt", "truncated or corrupt"), lambda t: _validate_job(t, _truncate_file)),
    Case("nerf-checkpoint-version", "a NeRF checkpoint of format version 99", "validate_checkpoint", "stage",
         ("checkpoint.pt", "format version 99"), lambda t: _validate_job(t, _future_format)),
    # -- detector and target set
    Case("detector-resume-other-config", "the detector's resume checkpoint was written with another lr",
         "train_detector", "library", ("resume/state.pt", "config.lr", "0.001"), _detector_resume_other_config),
    Case("detector-truncated", "model.pt cut to half its bytes", "evaluate", "stage",
         ("model.pt", "truncated or corrupt"), _evaluate_case(lambda m, a, i: _truncate_file(m, a))),
    Case("detector-format-unknown", "model.pt of an unknown format (instsim-detector-v0)", "evaluate", "stage",
         ("model.pt", "'format'", "instsim-detector-v1"), _evaluate_case(_foreign_detector)),
    Case("target-no-annotations", "a target set whose COCO json has no annotations", "evaluate", "stage",
         ("annotations.json", "'annotations'", "empty"), _evaluate_case(_edit_coco(lambda c: c.update(annotations=[])))),
    Case("target-bbox-negative", "a target box of negative width", "evaluate", "stage",
         ("annotations.json", "annotations[1].bbox", "-3"),
         _evaluate_case(_edit_coco(_set(("annotations", 1, "bbox"), [4, 4, -3, 12])))),
    Case("target-image-missing", "a target image named in the COCO json is missing", "evaluate", "stage",
         ("annotations.json", "images[1].file_name", "00001.png", "does not exist"),
         _evaluate_case(lambda m, a, images: (images / "00001.png").unlink())),
    # -- Neural-Sim
    Case("target-distribution-missing", "target/val/distribution.json without `probabilities`", "optimize_distribution",
         "stage", ("distribution.json", "'probabilities'", "missing"), _neuralsim_case(_no_probabilities)),
    Case("neuralsim-resume-other-config", "the Neural-Sim resume state was written with 5 iterations, the config says 3",
         "optimize_distribution", "stage", ("resume/state.pt", "iterations: 5 vs 3"), _neuralsim_case(_resume_of_other_settings)),
    Case("neuralsim-resume-truncated", "a truncated Neural-Sim resume state", "optimize_distribution", "stage",
         ("resume/state.pt", "truncated or corrupt"), _neuralsim_case(_truncated_resume)),
    # -- the user's COCO target (import_coco_target on a copy of the fixture's val split)
    Case("coco-image-missing", "a COCO image entry whose file is not there", "import_coco_target", "stage",
         ("annotations.json", "images[2].file_name", "image id 3", "00002.png", "does not exist"),
         _coco_import_case(lambda f: (f / "images" / "00002.png").unlink())),
    Case("coco-image-unreadable", "a COCO image replaced by text", "import_coco_target", "stage",
         ("annotations.json", "images[4].file_name", "image id 5", "cannot be decoded"),
         _coco_import_case(lambda f: (f / "images" / "00004.png").write_bytes(b"not a png\n"))),
    Case("coco-bbox-outside", "a box reaching past the right border of its 64 px image", "import_coco_target", "stage",
         ("annotations.json", "annotations[1].bbox", "annotation id 2 (image id 2)", "outside"),
         _coco_import_case(_coco_edit(_set(("annotations", 1, "bbox"), [40, 10, 30, 20])))),
    Case("coco-bbox-zero-size", "a box of zero height", "import_coco_target", "stage",
         ("annotations.json", "annotations[3].bbox", "annotation id 4", "> 0"),
         _coco_import_case(_coco_edit(_set(("annotations", 3, "bbox"), [10, 10, 12, 0])))),
    Case("coco-category-unknown", "an annotation of category id 99, which no category has", "import_coco_target",
         "stage", ("annotations.json", "annotations[5].category_id", "annotation id 6", "99"),
         _coco_import_case(_coco_edit(_set(("annotations", 5, "category_id"), 99)))),
    Case("coco-image-id-duplicate", "two images with id 1", "import_coco_target", "stage",
         ("annotations.json", "images[1].id", "duplicate image id 1"),
         _coco_import_case(_coco_edit(_set(("images", 1, "id"), 1)))),
    Case("coco-annotation-id-duplicate", "two annotations with id 3", "import_coco_target", "stage",
         ("annotations.json", "annotations[3].id", "duplicate annotation id 3"),
         _coco_import_case(_coco_edit(_set(("annotations", 3, "id"), 3)))),
    Case("coco-category-id-duplicate", "two categories with id 1", "import_coco_target", "stage",
         ("annotations.json", "categories[1].id", "duplicate category id 1"),
         _coco_import_case(_coco_edit(_set(("categories", 1, "id"), 1)))),
    Case("coco-no-images", "a COCO json whose image list is empty", "import_coco_target", "stage",
         ("annotations.json", "'images'", "empty"),
         _coco_import_case(_coco_edit(lambda c: c.update(images=[], annotations=[])))),
    Case("coco-split-empty", "a split whose images carry no annotation at all", "import_coco_target", "stage",
         ("annotations.json", "'annotations'", "empty"), _coco_import_case(_coco_edit(lambda c: c.update(annotations=[])))),
    Case("coco-size-mismatch", "an image entry whose width says 128, the file is 64 px wide", "import_coco_target",
         "stage", ("annotations.json", "images[0].width", "image id 1", "64x64"),
         _coco_import_case(_coco_edit(_set(("images", 0, "width"), 128)))),
    Case("coco-category-unmatched", "a category renamed `sofa`, which is no configured class (stage run directly)",
         "import_coco_target", "stage", ("annotations.json", "'categories'", "['chair', 'sofa']", "['chair', 'lamp']"),
         _coco_import_case(_coco_edit(_set(("categories", 1, "name"), "sofa")))),
    Case("coco-distribution-other-bins", "the given distribution.json has 4 zoom bins, the config's pose_space 3",
         "import_coco_target", "stage", ("distribution.json", "pose_space.zoom", "4 bins"),
         _coco_import_case(_coco_edit(lambda d: d["pose_space"]["zoom"].update(bins=4), "distribution.json"))),
    Case("config-coco-oracle-unknown", "a COCO target, strategy oracle, no target.distribution_file",
         "config (snakemake)", "snakemake", ("test_config.yaml", "strategies", "'oracle'", "target.distribution_file"),
         _coco_snakemake(lambda c: c["target"].pop("distribution_file"))),
    Case("config-coco-classes-unmatched", "the config's classes are lamp and sofa, the COCO categories chair and lamp",
         "config (snakemake)", "snakemake", ("test_config.yaml", "target.val", "['chair', 'lamp']", "['lamp', 'sofa']"),
         _coco_snakemake(lambda c: c["classes"].update(sofa=c["classes"].pop("chair")))),
    Case("config-coco-test-is-val", "target.test names the same COCO set as target.val", "config (snakemake)",
         "snakemake", ("test_config.yaml", "target.test", "held out"),
         _coco_snakemake(lambda c: c["target"].update(test=c["target"]["val"]))),
    # -- the config (Snakemake validates it before planning any job)
    Case("config-wrong-type", "`dataset.radius: far` (a string)", "config (snakemake)", "snakemake",
         ("test_config.yaml", "dataset.radius", "'far' is not of type 'number'"),
         _snakemake_config(_set(("dataset", "radius"), "far"))),
    Case("config-out-of-range", "`target.max_shift: 0.9` (maximum 0.4)", "config (snakemake)", "snakemake",
         ("test_config.yaml", "target.max_shift", "0.9 is greater than the maximum of 0.4"),
         _snakemake_config(_set(("target", "max_shift"), 0.9))),
    Case("config-unknown-gesture", "a procedural class with gesture `wave`", "config (snakemake)", "snakemake",
         ("test_config.yaml", "classes.fist.gesture", "'wave' is not one of"),
         _snakemake_config(_set(("classes", "fist", "gesture"), "wave"))),
    Case("config-unknown-source", "a class with source `teapot`", "config (snakemake)", "snakemake",
         ("test_config.yaml", "classes.cup", "teapot"),
         _snakemake_config(_set(("classes", "cup"), {"source": "teapot"}))),
    Case("config-folder-missing", "a folder class whose path does not exist", "config (snakemake)", "snakemake",
         ("test_config.yaml", "classes.mug.path", "/nonexistent/mug"),
         _snakemake_config(_set(("classes", "mug"), {"source": "folder", "path": "/nonexistent/mug"}))),
    Case("config-probabilities-sum", "target azimuth probabilities summing to 1.5", "config (snakemake)", "snakemake",
         ("test_config.yaml", "target.distribution.azimuth", "sum to 1.5"),
         _snakemake_config(_set(("target", "distribution", "azimuth"), [0.1, 0.1, 0.1, 0.1, 0.3, 0.4, 0.2, 0.2]))),
    Case("config-unknown-baseline", "`neuralsim.baseline: median`", "config (snakemake)", "snakemake",
         ("test_config.yaml", "neuralsim.baseline", "'median' is not one of"),
         _snakemake_config(_set(("neuralsim", "baseline"), "median"))),
    Case("workflow-folder-json-truncated", "a folder class's transforms_train.json truncated, run by Snakemake",
         "generate_dataset (snakemake)", "snakemake", ("transforms_train.json", "not valid JSON"),
         _snakemake_folder_json_truncated),
]

CASE_IDS = [c.id for c in CASES]


def table_rows() -> list[str]:
    """The catalogue's rows of the table in ``docs/reliability.md``."""
    rows = []
    for c in CASES:
        names = ", ".join(f"`{f}`" for f in c.expect)
        rows.append(f"| `{c.id}` | {c.broken} | {c.stage} | {c.entry} | non-zero | {names} | no outputs |")
    return rows


if __name__ == "__main__":
    print("\n".join(table_rows()))
