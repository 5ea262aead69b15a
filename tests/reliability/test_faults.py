"""Faults: a training job killed with SIGKILL resumes from its last checkpoint, loses at most one checkpoint
interval and ends where an uninterrupted run ends; a NaN or inf during training stops it with a clear error
and keeps the last good checkpoint; a write killed before its rename leaves the previous file intact.

Each test is named ``test_fault_<id>`` after its row in ``docs/reliability.md``.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import imageio.v3 as iio
import pytest
import torch

import instsim.detect.train as det_train
import instsim.nerf.train as train_mod
import reliability_worker as worker
from conftest import BLENDERNERF_TINY
from instsim.detect import DetectorConfig, DetectorTrainingError, load_detector, train_detector
from instsim.errors import InstsimError
from instsim.nerf.checkpoint import load_checkpoint
from instsim.nerf.config import NerfConfig
from instsim.nerf.train import train_nerf
from instsim.nerf.validate import validate_checkpoint
from instsim.neuralsim.config import NeuralSimConfig
from instsim.neuralsim.loop import optimize_distribution
from instsim.neuralsim.step import NeuralSimError
from instsim.stages.intrinsics import extract_intrinsics
from instsim.transforms import load_views
from reliability_cases import train_nerf_job
from reliability_stage import FakeSnakemake, run_stage_script
from test_neuralsim_loop import disk_bilevel, disk_renderer, make_disk_problem
from workflow_utils import repo_env

WORKER = Path(worker.__file__)


# thousands of small ops on two shared cores: one torch thread per test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------
# kill and resume
# ---------------------------------------------------------------------------------------------------------


def _start(job: str, workdir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    out = workdir.parent / f"{workdir.name}.{job}.out"
    with out.open("a") as f:
        proc = subprocess.Popen([sys.executable, str(WORKER), job, str(workdir), *args], stdout=f,
                                stderr=subprocess.STDOUT, env=repo_env())
    return proc, out


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], out: Path, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fail if it ends (or times out) first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before it could be killed:\n{out.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the job never reached the kill point:\n{out.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _run_to_end(job: str, workdir: Path, timeout: float = 300.0) -> str:
    proc, out = _start(job, workdir)
    assert proc.wait(timeout=timeout) == 0, out.read_text()[-5000:]
    return out.read_text()


def _last_number(lines: list[str], prefix: str) -> int:
    """The number after ``prefix`` in the last line that starts with it (0 when none does)."""
    found = [line[len(prefix):].split()[0].split("/")[0] for line in lines if line.startswith(prefix)]
    return int(found[-1]) if found else 0


def _checkpoint_step(path: Path, key: str) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)[key])
    except Exception:  # noqa: BLE001  not written yet (an atomic rename makes a half file impossible)
        return 0


def _tsv_last_step(path: Path) -> int:
    if not path.is_file():
        return 0
    rows = [r.split("\t")[0] for r in path.read_text().splitlines()[1:]]
    return int(rows[-1]) if rows and rows[-1].isdigit() else 0


def _psnr_on_test_views(checkpoint: Path) -> float:
    model, _ = load_checkpoint(checkpoint)
    views = load_views(BLENDERNERF_TINY / "transforms_test.json")
    return validate_checkpoint(model, views, background="white", min_psnr=0.0)["psnr"]


def test_fault_nerf_sigkill_resume(tmp_path):
    every = worker.NERF["checkpoint_every"]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    _run_to_end("nerf", ref_dir)
    sm: FakeSnakemake = train_nerf_job(run_dir, **worker.NERF)
    state, log_tsv = Path(sm.params.resume), Path(sm.params.resume).with_name("train_log.tsv")

    # kill it between the first and the second checkpoint
    proc, out = _start("nerf", run_dir)
    # the cheap log check first: loading the checkpoint at every poll would slow the job it watches
    _kill_when(proc, lambda: _tsv_last_step(log_tsv) >= every + 10 and _checkpoint_step(state, "step") >= every, out)
    reached, saved = _tsv_last_step(log_tsv), _checkpoint_step(state, "step")
    assert saved >= every and 0 <= reached - saved <= every, (reached, saved)
    assert not any(Path(p).exists() for p in sm.output), "a killed train_nerf left an output that looks finished"

    _run_to_end("nerf", run_dir)
    log = Path(sm.log[0]).read_text()
    assert f"'start_step': {saved}," in log, log[-2000:]  # it resumed, it did not start over
    steps = [int(r.split("\t")[0]) for r in Path(sm.output.train_log).read_text().splitlines()[1:]]
    assert steps == list(range(5, worker.NERF["steps"] + 1, 5))  # rows past the checkpoint were redone once
    assert not state.parent.exists()  # the resume state is cleaned up when the stage finishes

    ref_ckpt = train_nerf_job(ref_dir, **worker.NERF).output.checkpoint
    ref = torch.load(ref_ckpt, weights_only=True)["model"]
    got = torch.load(sm.output.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(ref[k], got[k]) for k in ref), "the resumed NeRF differs from an uninterrupted run"
    psnr_ref, psnr_got = _psnr_on_test_views(Path(ref_ckpt)), _psnr_on_test_views(Path(sm.output.checkpoint))
    assert psnr_ref > 15 and psnr_got == psnr_ref


def test_fault_detector_sigkill_resume(tmp_path):
    every = worker.DETECTOR["checkpoint_every"]
    proc, out = _start("detector", tmp_path)
    printed = lambda: _last_number(out.read_text().splitlines(), "step ")  # noqa: E731
    _kill_when(proc, lambda: printed() >= 2 * every + 5 and _checkpoint_step(tmp_path / "state.pt", "step") >= 2 * every, out)
    reached, saved = printed(), _checkpoint_step(tmp_path / "state.pt", "step")
    assert saved >= 2 * every and 0 <= reached - saved <= every, (reached, saved)
    assert not (tmp_path / "model.pt").exists()

    text = _run_to_end("detector", tmp_path)
    assert f"resumed detector training from {tmp_path / 'state.pt'} at step {saved}/" in text, text[-2000:]
    images, boxes, labels = worker.shapes_data()
    reference = train_detector(images, boxes, labels, DetectorConfig(**worker.DETECTOR), progress=False)
    resumed = load_detector(tmp_path / "model.pt")
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_fault_neuralsim_sigkill_resume(tmp_path):
    every = worker.NEURALSIM["checkpoint_every"]
    proc, out = _start("neuralsim", tmp_path / "killed")
    printed = lambda: _last_number(out.read_text().splitlines(), "iteration ")  # noqa: E731
    state = tmp_path / "killed" / "state.pt"
    _kill_when(proc, lambda: printed() >= every + 1 and _checkpoint_step(state, "iteration") >= every, out)
    reached, saved = printed(), _checkpoint_step(state, "iteration")
    assert saved >= every and 0 <= reached - saved <= every, (reached, saved)
    assert not (tmp_path / "killed" / "psi.pt").exists()

    text = _run_to_end("neuralsim", tmp_path / "killed")
    assert f"resumed Neural-Sim from {state} at iteration {saved}/" in text, text[-2000:]
    worker.run_neuralsim(tmp_path / "reference", checkpoint=False)  # uninterrupted, in this process
    ref = torch.load(tmp_path / "reference" / "psi.pt", weights_only=True)
    got = torch.load(tmp_path / "killed" / "psi.pt", weights_only=True)
    assert all(torch.equal(ref["psi"][k], got["psi"][k]) for k in ref["psi"])
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # noqa: E731
    assert untimed(got["rows"]) == untimed(ref["rows"])


# ---------------------------------------------------------------------------------------------------------
# NaN and inf during training
# ---------------------------------------------------------------------------------------------------------


def test_fault_nerf_nan_loss(tmp_path, monkeypatch):
    real, calls = train_mod.render_rays, {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 15:  # from step 15 on (one render per step)
            out["rgb"] = out["rgb"] * float("nan")
        return out

    monkeypatch.setattr(train_mod, "render_rays", poisoned)
    sm = train_nerf_job(tmp_path, steps=30, checkpoint_every=10)
    res = run_stage_script("train_nerf", sm)
    assert res.exit_code == 1
    assert "train_nerf failed: NeRF training diverged: loss is nan at step 15" in res.log, res.log[-2000:]
    assert f"{sm.params.resume}) is kept" in res.log
    assert torch.load(sm.params.resume, weights_only=True)["step"] == 10  # the last good checkpoint
    assert res.leftover_outputs() == []


def test_fault_nerf_inf_gradient(tmp_path, monkeypatch):
    """A finite loss with an infinite gradient: Adam turns the weights to NaN one step before the loss shows it.
    The checkpoint due at that step must not be written over the last good one."""
    real, calls = train_mod.render_rays, {"n": 0}

    def inf_backward(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 20 and out["rgb"].requires_grad:  # step 19, whose end is checkpoint 20
            out["rgb"].register_hook(lambda g: g * float("inf"))
        return out

    monkeypatch.setattr(train_mod, "render_rays", inf_backward)
    cfg = NerfConfig.cpu(steps=30, checkpoint_every=10, threads=1)
    ckpt = tmp_path / "state.pt"
    with pytest.raises(InstsimError, match=r"non-finite values in .* after step 20\. The last good checkpoint"):
        train_nerf(load_views(BLENDERNERF_TINY / "transforms_train.json"),
                   extract_intrinsics(BLENDERNERF_TINY / "transforms_train.json"), cfg, ckpt, tmp_path / "log.tsv",
                   progress=False)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fault_detector_inf_loss(tmp_path, monkeypatch):
    real, calls = det_train.compute_loss, {"n": 0}

    def inf_at_step_7(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("inf"), parts) if calls["n"] == 8 else (loss, parts)

    monkeypatch.setattr(det_train, "compute_loss", inf_at_step_7)
    images, boxes, labels = worker.shapes_data()
    cfg = DetectorConfig(**{**worker.DETECTOR, "checkpoint_every": 3})
    with pytest.raises(DetectorTrainingError, match=r"diverged at step 7: loss inf.*last good checkpoint: .*state\.pt \(step 6\)"):
        train_detector(images, boxes, labels, cfg, checkpoint_path=tmp_path / "state.pt", progress=False)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fault_neuralsim_inf_render(tmp_path):
    calls = {"plain": 0}

    def inf_images(model, c2w, intr, shifts, requires_grad):
        out = disk_renderer(model, c2w, intr, shifts, requires_grad)
        if not requires_grad:
            calls["plain"] += 1
            if calls["plain"] == 3:  # iteration 3's training images (one class, one render per iteration)
                out = out * float("inf")
        return out

    cfg = NeuralSimConfig.from_dict({**worker.NEURALSIM, "iterations": 4})
    with pytest.raises(NeuralSimError, match=r"diverged.*iteration 2\) is kept"):
        optimize_distribution(disk_bilevel(make_disk_problem(), renderer=inf_images), cfg, progress=False,
                              checkpoint_path=tmp_path / "state.pt", log_fn=lambda m: None)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["iteration"] == 2
    assert all(math.isfinite(float(v)) for t in state["psi"].values() for v in t.flatten())


# ---------------------------------------------------------------------------------------------------------
# atomic outputs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer, name", [("json", "out.json"), ("png", "out.png"), ("torch", "out.pt")])
def test_fault_write_killed_before_rename(tmp_path, writer, name):
    proc, out = _start("atomic", tmp_path, writer)
    assert proc.wait(timeout=120) == -signal.SIGKILL, out.read_text()[-3000:]
    path = tmp_path / name
    if writer == "json":
        assert path.read_text() == '{\n  "value": 1\n}\n'
    elif writer == "png":
        assert int(iio.imread(path)[0, 0, 0]) == round(0.1 * 255)
    else:
        assert torch.equal(torch.load(path, weights_only=True)["value"], torch.full((1000,), 1.0))
    # the half-done write is a hidden temporary file, never under the output's name
    others = sorted(p.name for p in tmp_path.iterdir() if p.is_file() and p != path and not p.name.endswith(".out"))
    assert others and all(n.startswith(f".{path.stem}.") and ".tmp" in n for n in others), others
