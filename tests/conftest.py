"""Shared fixtures: paths of the repo and its small data, copies of the BlenderNeRF fixture, and the one local
run of the tiny workflow that every test module reading a finished run shares."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BLENDERNERF_TINY = DATA / "blendernerf_tiny"
# Two BlenderNeRF classes (lamp, chair) made in real Blender and a COCO target of them with a shifted pose
# distribution; a copy of shared/data/blender_coco_tiny, whose PROVENANCE.md says how it was made.
BLENDER_COCO_TINY = DATA / "blender_coco_tiny"

# Two cores on CI: keep torch from oversubscribing them while pytest runs.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def blendernerf_copy(tmp_path: Path) -> Path:
    """A writable copy of the real BlenderNeRF dataset (tests may corrupt it)."""
    dst = tmp_path / "blendernerf_tiny"
    shutil.copytree(BLENDERNERF_TINY, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished local run of configs/tiny.yaml (its working directory), made once per pytest session and
    read by several test modules: do not change it (copy it first, as tests/test_rerun.py does)."""
    from workflow_utils import run_snakemake  # imported here: workflow_utils imports this module

    workdir = tmp_path_factory.mktemp("tiny_run")
    proc = run_snakemake(workdir, None, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test: thousands of small ops gain nothing from more, and on two shared
    cores the extra threads stall each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def instsim_logger_reset():
    """Tests that run a stage in-process (:func:`instsim.stages.runner.run_stage`) point the ``instsim`` logger at
    the stage's log file and stop it propagating; undo that after each test so the next one's ``caplog`` (on the
    root logger) sees instsim's records whatever ran before."""
    yield
    logger = logging.getLogger("instsim")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
