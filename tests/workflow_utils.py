"""Run the Snakemake workflow in a scratch folder, as a user would, for the workflow tests."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import BLENDER_COCO_TINY, REPO

TINY = REPO / "configs" / "tiny.yaml"


def tiny_config(**overrides) -> dict:
    """The tiny config with top-level keys replaced."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg.update(copy.deepcopy(overrides))
    return cfg


#: the fixture's target zoom bins relative to its classes' training-camera distance (4.0): 2.6-4.4 world units
BYO_ZOOM = {"bins": 3, "low": 0.65, "high": 1.1}


def byo_config(**target) -> dict:
    """The tiny config on the real Blender fixture: its lamp and chair BlenderNeRF folders as classes and its
    COCO splits as the target (val: the quirky export, with an image nobody annotated; images resized from 64 to
    48 px), the oracle from its distribution in relative zoom (DERIVED.md) and the pose space of its bins;
    ``target`` replaces keys of the target section."""
    d = BLENDER_COCO_TINY
    cfg = tiny_config(
        classes={"chair": {"source": "folder", "path": str(d / "chair")}, "lamp": {"source": "folder", "path": str(d / "lamp")}},
        target={"source": "coco", "image_size": 48, "fov_deg": 39.6, "max_shift": 0.15,
                "val": {"annotations": str(d / "target" / "val" / "annotations_quirky.json"),
                        "images": str(d / "target" / "val" / "images")},
                "test": str(d / "target" / "test"), "distribution_file": str(d / "target" / "distribution_relative_zoom.json"),
                **target},
    )
    cfg["pose_space"]["zoom"] = dict(BYO_ZOOM)
    return cfg


def run_snakemake(workdir: Path, config: dict | None = None, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """``snakemake`` on the repo's Snakefile in ``workdir`` with ``config`` (default: tiny) written there."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "test_config.yaml"
    cfg_path.write_text(yaml.safe_dump(config if config is not None else tiny_config(), sort_keys=False))
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(cfg_path), "--cores", "2", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=repo_env())


def repo_env() -> dict[str, str]:
    """The environment with this checkout first on ``PYTHONPATH``: a subprocess (Snakemake's jobs included)
    must run this checkout's ``instsim``, not whatever copy happens to be installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env
    

def slurm_helpers(name: str):
    """tests/slurm/<name>.py as a module, loaded once per session (tests/slurm is not a package)."""
    full = f"instsim_tests_slurm_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, REPO / "tests" / "slurm" / f"{name}.py")
        sys.modules[full] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[full]
