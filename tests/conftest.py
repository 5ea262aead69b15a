"""Shared fixtures: paths of the repo and its small data, and copies of the BlenderNeRF fixture."""

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BLENDERNERF_TINY = DATA / "blendernerf_tiny"

# Two cores on CI: keep torch from oversubscribing them while pytest runs.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def blendernerf_copy(tmp_path: Path) -> Path:
    """A writable copy of the real BlenderNeRF dataset (tests may corrupt it)."""
    dst = tmp_path / "blendernerf_tiny"
    shutil.copytree(BLENDERNERF_TINY, dst)
    return dst
