"""GPU jobs on a host's GPUs: instsim.gpus.claim_gpu with fake GPU counts (one job per GPU, and several sharing
one), the stage hook, and the default profile's `gpu` limit. No GPU is needed: the count is faked (a patched gpu_count, or a fake
nvidia-smi on PATH) and CUDA is never started."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yte

from conftest import REPO
from instsim import gpus
from instsim.stages.runner import run_stage

# A process that claims a GPU out of `sys.argv[1]` fake ones, prints what it got, then holds it until the
# file `sys.argv[2]` exists (or forever when that is "-").
HOLDER = """
import os, sys, time
from instsim import gpus
gpus.gpu_count = lambda: int(sys.argv[1])
with gpus.claim_gpu(poll_s=0.05) as index:
    print(index, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    while sys.argv[2] == "-" or not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
"""


@pytest.fixture
def lock_dir(tmp_path, monkeypatch) -> Path:
    """A fresh lock folder for this test (children inherit it), no GPU chosen yet, one job per GPU (tests of
    sharing set INSTSIM_JOBS_PER_GPU themselves)."""
    folder = tmp_path / "locks"
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(folder))
    monkeypatch.setenv(gpus.JOBS_PER_GPU_ENV, "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return folder


def _holder(n_gpus: int, release: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(n_gpus), release], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _claimed(proc: subprocess.Popen) -> tuple[int, str]:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    index, visible = line.split()
    return int(index), visible


def test_parallel_jobs_get_distinct_gpus(lock_dir, tmp_path, monkeypatch):
    release = tmp_path / "release"
    holders = [_holder(3, str(release)) for _ in range(3)]
    try:
        got = [_claimed(p) for p in holders]
        assert sorted(i for i, _ in got) == [0, 1, 2]
        assert all(visible == str(i) for i, visible in got)
        # A fourth job finds every GPU taken: it waits, and gives up after its timeout.
        monkeypatch.setattr(gpus, "gpu_count", lambda: 3)
        with pytest.raises(gpus.GpuBusyError, match="all 3 GPUs"):
            with gpus.claim_gpu(poll_s=0.05, timeout_s=0.3):
                pass
    finally:
        release.touch()
        for p in holders:
            p.wait(timeout=30)
    assert [p.returncode for p in holders] == [0, 0, 0]
    with gpus.claim_gpu(timeout_s=0) as index:  # all released on exit
        assert index == 0


def test_waiting_job_gets_the_gpu_when_it_is_released(lock_dir, tmp_path, monkeypatch):
    release = tmp_path / "release"
    holder = _holder(1, str(release))
    try:
        assert _claimed(holder) == (0, "0")
        monkeypatch.setattr(gpus, "gpu_count", lambda: 1)
        threading.Timer(0.5, release.touch).start()  # the holder finishes in half a second
        start = time.monotonic()
        with gpus.claim_gpu(poll_s=0.05, timeout_s=30) as index:
            assert index == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert time.monotonic() - start >= 0.4
    finally:
        release.touch()
        holder.wait(timeout=30)


def test_killed_holder_frees_its_gpu(lock_dir, monkeypatch):
    holder = _holder(1, "-")
    try:
        assert _claimed(holder) == (0, "0")
        monkeypatch.setattr(gpus, "gpu_count", lambda: 1)
        with pytest.raises(gpus.GpuBusyError):
            with gpus.claim_gpu(timeout_s=0):
                pass
        holder.send_signal(signal.SIGKILL)  # no clean exit: the kernel drops its lock
        holder.wait(timeout=30)
        with gpus.claim_gpu(timeout_s=0) as index:
            assert index == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_gpu_already_chosen_is_left_alone(lock_dir, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(gpus, "gpu_count", lambda: pytest.fail("must not even count the GPUs"))
    with gpus.claim_gpu() as index:
        assert index is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not lock_dir.exists()


def test_no_gpu_is_a_no_op(lock_dir, monkeypatch):
    monkeypatch.setattr(gpus, "gpu_count", lambda: 0)
    with gpus.claim_gpu() as index:
        assert index is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not lock_dir.exists()


def test_jobs_share_a_gpu_up_to_its_slots(lock_dir, tmp_path, monkeypatch):
    """One GPU, three slots: three jobs run on it at once, a fourth waits; a finished job's slot is reused."""
    monkeypatch.setenv(gpus.JOBS_PER_GPU_ENV, "3")
    release = tmp_path / "release"
    holders = [_holder(1, str(release)) for _ in range(3)]
    try:
        assert [_claimed(p) for p in holders] == [(0, "0")] * 3
        monkeypatch.setattr(gpus, "gpu_count", lambda: 1)
        with pytest.raises(gpus.GpuBusyError, match="3 jobs each"):
            with gpus.claim_gpu(poll_s=0.05, timeout_s=0.3):
                pass
    finally:
        release.touch()
        for p in holders:
            p.wait(timeout=30)
    held = sorted(p.name for p in lock_dir.glob("gpu*.lock"))
    assert held == ["gpu0.slot0.lock", "gpu0.slot1.lock", "gpu0.slot2.lock"]
    with gpus.claim_gpu(timeout_s=0) as index:
        assert index == 0


def test_jobs_spread_over_gpus_before_sharing(lock_dir, tmp_path, monkeypatch):
    """Two GPUs, two slots each: the first two jobs get different GPUs, the next two fill the second slots;
    a job killed on GPU 1 frees that GPU's slot for the next job (not one on the busier GPU 0)."""
    monkeypatch.setenv(gpus.JOBS_PER_GPU_ENV, "2")
    release = tmp_path / "release"
    first = [_holder(2, str(release))]
    try:
        got = [_claimed(first[0])]
        first.append(_holder(2, "-"))  # this one is killed below
        got.append(_claimed(first[1]))
        assert sorted(i for i, _ in got) == [0, 1]  # one job per GPU while a GPU is free
        more = [_holder(2, str(release)) for _ in range(2)]
        first += more
        assert sorted(_claimed(p)[0] for p in more) == [0, 1]
        monkeypatch.setattr(gpus, "gpu_count", lambda: 2)
        with pytest.raises(gpus.GpuBusyError):
            with gpus.claim_gpu(timeout_s=0):
                pass
        killed_gpu = got[1][0]
        first[1].send_signal(signal.SIGKILL)
        first[1].wait(timeout=30)
        with gpus.claim_gpu(timeout_s=0) as index:
            assert index == killed_gpu
    finally:
        release.touch()
        for p in first:
            if p.poll() is None and p is not first[1]:
                p.wait(timeout=30)
            elif p.poll() is None:
                p.kill()
                p.wait()


def test_several_listed_gpus_are_claimed_among(lock_dir, tmp_path, monkeypatch):
    """CUDA_VISIBLE_DEVICES set by hand to several devices: jobs claim among those, and it is restored after."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    release = tmp_path / "release"
    holder = _holder(8, str(release))  # its fake count of 8 is not used: the listed devices are the GPUs
    try:
        assert _claimed(holder) == (2, "2")
        monkeypatch.setattr(gpus, "gpu_count", lambda: pytest.fail("the listed devices are the GPUs"))
        with gpus.claim_gpu(timeout_s=0) as got:
            assert got == "5" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,5"
    finally:
        release.touch()
        holder.wait(timeout=30)


def test_bad_jobs_per_gpu_is_named(monkeypatch):
    monkeypatch.setenv(gpus.JOBS_PER_GPU_ENV, "zero")
    with pytest.raises(gpus.InstsimError, match="INSTSIM_JOBS_PER_GPU='zero'"):
        gpus.jobs_per_gpu()
    monkeypatch.delenv(gpus.JOBS_PER_GPU_ENV)
    assert gpus.jobs_per_gpu() == gpus.JOBS_PER_GPU


def _fake_snakemake(tmp_path, gpu: int) -> SimpleNamespace:
    return SimpleNamespace(log=[str(tmp_path / "stage.log")], rule="train_nerf", wildcards={"cls": "fist"},
                           resources=SimpleNamespace(gpu=gpu, mem_mb=1000))


def test_stage_with_gpu_resource_runs_on_a_claimed_gpu(lock_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "gpu_count", lambda: 2)
    seen = {}
    run_stage(_fake_snakemake(tmp_path, 1), lambda sm: seen.update(gpu=os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert seen["gpu"] == "0" and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert "claimed GPU 0 of 2" in (tmp_path / "stage.log").read_text()
    run_stage(_fake_snakemake(tmp_path, 0), lambda sm: seen.update(cpu=os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert seen["cpu"] is None


NVIDIA_SMI_L = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-2222-3333-4444-555555555555)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-66666666-7777-8888-9999-000000000000)
  MIG 3g.20gb     Device  0: (UUID: MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-ffffffff-2222-3333-4444-555555555555)
"""


@pytest.mark.parametrize(
    "listing, exit_code, expected",
    [(NVIDIA_SMI_L, 0, 3), ("", 0, 0), ("NVIDIA-SMI has failed", 9, 0), (None, 0, 0)],
    ids=["three-gpus-one-with-mig", "empty", "driver-error", "no-nvidia-smi"],
)
def test_gpu_count_and_the_default_profile_agree(tmp_path, monkeypatch, listing, exit_code, expected):
    """gpu_count() reads `nvidia-smi -L`; profiles/default sets the `gpu` limit to the same count (at least 1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if listing is not None:  # None: no nvidia-smi on PATH at all
        (bin_dir / "listing").write_text(listing)
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 2\n/bin/cat "{bin_dir / "listing"}"\nexit {exit_code}\n')
        smi.chmod(0o755)
    # only the fake (no system folders: a real nvidia-smi there would be found in the no-nvidia-smi case)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(gpus.JOBS_PER_GPU_ENV, raising=False)
    assert gpus.gpu_count() == expected
    assert _profile_gpu_limit() == max(1, expected) * gpus.jobs_per_gpu()
    monkeypatch.setenv(gpus.JOBS_PER_GPU_ENV, "2")
    assert _profile_gpu_limit() == max(1, expected) * 2 == max(1, expected) * gpus.jobs_per_gpu()


def _profile_gpu_limit() -> int:
    with open(REPO / "profiles" / "default" / "config.yaml") as f:
        profile = yte.process_yaml(f, require_use_yte=True)
    (entry,) = profile["resources"]
    name, value = entry.split("=")
    assert name == "gpu"
    return int(value)


@pytest.mark.parametrize("visible, gpus_counted", [("0", 1), ("0,1", 2), ("", 0), ("GPU-aaaa,GPU-bbbb,GPU-cccc", 3)])
def test_profile_counts_the_visible_gpus(monkeypatch, visible, gpus_counted):
    """Where CUDA_VISIBLE_DEVICES is set, the profile counts the devices it lists (not nvidia-smi's): the
    README's one-GPU timing (CUDA_VISIBLE_DEVICES=0) on a host with several gets one card's jobs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.delenv(gpus.JOBS_PER_GPU_ENV, raising=False)
    assert _profile_gpu_limit() == max(1, gpus_counted) * gpus.JOBS_PER_GPU


# A GPU stage as a workflow script runs it (run_stage with a `gpu` resource), on `sys.argv[1]` fake GPUs: it logs
# to `sys.argv[2]` and holds its GPU until the file `sys.argv[3]` exists (or until killed, when that is "-").
STAGE = """
import os, sys, time
from types import SimpleNamespace
from instsim import gpus
from instsim.stages.runner import run_stage
gpus.gpu_count = lambda: int(sys.argv[1])
sm = SimpleNamespace(log=[sys.argv[2]], rule="train_detector", wildcards={}, threads=1,
                     resources=SimpleNamespace(gpu=1))
hold = sys.argv[3]
def body(sm):
    print("holding", flush=True)
    while hold == "-" or not os.path.exists(hold):
        time.sleep(0.02)
run_stage(sm, body)
"""


def test_claim_logs_pass_the_run_checker_and_catch_a_bad_claim(lock_dir, tmp_path, monkeypatch):
    """Stages on 2 fake GPUs x 2 slots, more jobs than slots, one killed mid-run: the logs they write satisfy
    benchmarks/check_gpu_claims.py (balanced claims, no wait while a slot was free, the killed job's GPU
    reused); a log edited to show a claim on the busier GPU fails it."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import json

    import check_gpu_claims

    monkeypatch.setenv(gpus.JOBS_PER_GPU_ENV, "2")
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def stage(name: str, hold: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", STAGE, "2", str(results / "logs" / f"{name}.log"), hold],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        return p

    release = tmp_path / "release"
    procs = {"victim": stage("victim", "-"), **{f"a{i}": stage(f"a{i}", str(release)) for i in range(3)}}
    for p in procs.values():  # all four slots held
        assert p.stdout.readline().strip() == "holding", p.stderr.read()
    procs["waiter"] = stage("waiter", str(release))
    deadline = time.monotonic() + 60
    while "waiting for one" not in (results / "logs" / "waiter.log").read_text() if (results / "logs" / "waiter.log").exists() else True:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.5)  # it waits while every slot is held
    log_text = (results / "logs" / "victim.log").read_text()
    victim_gpu = log_text.split("claimed GPU ")[1].split()[0]
    procs["victim"].send_signal(signal.SIGKILL)
    procs["victim"].wait(timeout=30)
    kill_time = time.time()
    assert procs["waiter"].stdout.readline().strip() == "holding"
    waiter_log = (results / "logs" / "waiter.log").read_text()
    slot_free = waiter_log.split("claimed GPU ")[1].split()[0] == victim_gpu  # it got the killed job's slot
    release.touch()
    for name, p in procs.items():
        if name != "victim":
            assert p.wait(timeout=60) == 0, p.stderr.read()
    kills = [{"log": "logs/victim.log", "time": kill_time, "gpu": victim_gpu, "slot_free_after": slot_free}]
    jobs = check_gpu_claims.read_jobs(results, kills)
    report = check_gpu_claims.check(jobs, kills)
    assert report["passed"], report["problems"]
    assert report["jobs"] == 5 and report["max_jobs_on_one_gpu"] == 2 and report["waits_over_1_s"] == 1
    assert report["kill_frees"] and report["kills"][0]["later_claims_on_that_gpu"] == 1
    # the same logs with the first job's partner moved onto its GPU: a claim on the busier GPU, three on one GPU
    first = min(jobs, key=lambda j: j["start"])
    second = sorted(jobs, key=lambda j: j["start"])[1]
    second["gpu"] = first["gpu"]
    bad = check_gpu_claims.check(jobs, [])
    assert not bad["balanced"] and not bad["passed"]
    json.dumps(report)  # what the run script writes
