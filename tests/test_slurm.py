"""The workflow on a real SLURM: a throwaway single-node cluster (tests/slurm/cluster.py: munged, slurmctld,
slurmd under a temporary folder) runs configs/tiny.yaml through profiles/slurm, every stage as its own SLURM
job, and the results must match a local run's. Also: the profile's settings (no SLURM needed), and that the
test cluster stops exactly the daemons it started.

Skips only where SLURM cannot be installed (not root, or no apt-get); installs slurm-wlm and munge with apt
when they are missing. Needs the `slurm` extra (snakemake-executor-plugin-slurm).
"""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO
from workflow_utils import slurm_helpers, tiny_config

pytestmark = pytest.mark.workflow

SLURM_PROFILE = REPO / "profiles" / "slurm"
TEST_PROFILE = REPO / "tests" / "slurm" / "profile"  # test-cluster overrides, layered on the profile
RUN_TIMEOUT_S = 3600  # a hang guard only; `timeout -k 10` because Snakemake ignores SIGTERM while jobs run


slurm = slurm_helpers("cluster")
runs = slurm_helpers("runs")


def _need_slurm():
    try:
        slurm.ensure_installed()
    except slurm.SlurmUnavailable as e:
        pytest.skip(f"no SLURM test cluster here: {e}")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail("snakemake-executor-plugin-slurm is missing: pip install -e '.[slurm]'")


@pytest.fixture(scope="module")
def cluster():
    _need_slurm()
    c = slurm.TestCluster()
    try:
        with slurm.interrupt_on_sigterm():  # a SIGTERM to pytest still runs this teardown
            c.start()
            yield c
    finally:
        c.stop()
        alive = [d for d, up in c.running().items() if up] + c.job_processes()
        shutil.rmtree(c.root, ignore_errors=True)
        assert not alive, f"still running after stop(): {alive}"


def _slurm_jobs(cluster) -> list[dict]:
    """Every job the cluster knows (finished ones stay for MinJobAge, 2 h here), as key=value dicts."""
    proc = subprocess.run(["scontrol", "-o", "show", "jobs"], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jobs = []
    for line in proc.stdout.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if "JobId" in fields:
            jobs.append(fields)
    return jobs


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """configs/tiny.yaml run through profiles/slurm on the test cluster, as a user would start it."""
    workdir = tmp_path_factory.mktemp("slurm_run")
    config = workdir / "test_config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(), sort_keys=False))
    plan = runs.planned_jobs(workdir, config)
    # GPU stages (rules with a `gpu` resource) ask for none on a CPU-only host; make them ask for one of a
    # named model here, so SLURM's GPU path runs too (the test node has fake GPUs of that model; the stages
    # still compute on the CPU).
    gpu_rules = sorted({j.rule for j in plan if re.search(r"(^|, )gpu=", j.resources)})
    cmd = [
        "timeout", "-k", "10", str(RUN_TIMEOUT_S),
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(config),
        "--workflow-profile", str(SLURM_PROFILE), "--profile", str(TEST_PROFILE),
    ]
    if gpu_rules:
        cmd += ["--set-resources", *(f"{rule}:gpu=1" for rule in gpu_rules),
                *(f"{rule}:gpu_model={slurm.FAKE_GPU_MODEL}" for rule in gpu_rules)]
    start = time.monotonic()
    # Own process group: if the test is interrupted, the whole run goes at once, before the cluster stops.
    popen = subprocess.Popen(cmd, cwd=workdir, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        stdout, stderr = popen.communicate()
    except BaseException:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    seconds = time.monotonic() - start
    out = proc.stdout + "\n" + proc.stderr
    return SimpleNamespace(
        workdir=workdir, proc=proc, out=out, seconds=seconds, plan=plan, gpu_rules=gpu_rules,
        ran=runs.parse_jobs(out), slurm_jobs=_slurm_jobs(cluster),
    )


def _failure_report(run, cluster) -> str:
    logs = sorted((run.workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    failed = [p for p in logs if "Error" in p.read_text(errors="replace")]
    parts = [f"snakemake exit {run.proc.returncode} after {run.seconds:.0f} s", run.out[-6000:]]
    parts += [f"--- {p}:\n" + p.read_text(errors="replace")[-3000:] for p in failed[:3]]
    parts += [cluster.tail("slurmctld"), cluster.tail("slurmd")]
    return "\n".join(parts)


def test_tiny_run_through_slurm_succeeds(slurm_run, cluster):
    assert slurm_run.proc.returncode == 0, _failure_report(slurm_run, cluster)
    print(f"tiny run through SLURM: {slurm_run.seconds:.0f} s")


def test_every_stage_ran_as_a_slurm_job(slurm_run, cluster):
    assert slurm_run.proc.returncode == 0, _failure_report(slurm_run, cluster)
    assert sorted(j.key for j in slurm_run.ran) == sorted(j.key for j in slurm_run.plan)
    submitted = [j for j in slurm_run.ran if not j.local]
    assert submitted and {j.rule for j in slurm_run.ran if j.local} <= {"all"}

    ids = re.findall(r"has been submitted with SLURM jobid (\d+)", slurm_run.out)
    assert len(ids) == len(submitted), "one SLURM job per stage job, no resubmission"
    ours = [j for j in slurm_run.slurm_jobs if j["JobId"] in ids]
    assert len(ours) == len(ids)
    assert {j["JobState"] for j in ours} == {"COMPLETED"}, [(j["JobId"], j["JobState"]) for j in ours]
    # The plugin names each job after its rule (and wildcards) in the comment.
    assert sorted(re.match(r"rule_(\w+?)(_wildcards_.*)?$", j["Comment"]).group(1) for j in ours) == sorted(
        j.rule for j in submitted
    )
    for j in ours:
        rule = re.match(r"rule_(\w+?)(_wildcards_.*)?$", j["Comment"]).group(1)
        gpus = j.get("TresPerJob", "") + j.get("TresPerNode", "")
        expected = f"gpu:{slurm.FAKE_GPU_MODEL}:1" if rule in slurm_run.gpu_rules else ""
        assert (expected in gpus if expected else "gpu" not in gpus), (rule, gpus)
        # SLURM logs land in .snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log (kept here on success).
        assert list((slurm_run.workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{j['JobId']}.log"))


def test_slurm_results_match_a_local_run(slurm_run, cluster, tiny_run):
    assert slurm_run.proc.returncode == 0, _failure_report(slurm_run, cluster)
    diffs, compared = runs.compare_results(tiny_run, slurm_run.workdir)
    assert not diffs, "\n".join(diffs[:50])
    for must in ("results/data/fist/transforms_train.json", "results/data/fist/intrinsics.json",
                 "results/target/test/annotations.json"):
        assert must in compared
    print(f"compared {len(compared)} json/tsv files: {compared}")


def test_cluster_stops_exactly_its_own_daemons(tmp_path):
    """stop() cancels the cluster's jobs and ends its daemons by PID; same-named processes live on."""
    _need_slurm()
    decoys = []
    for name in ("munged", "slurmctld", "slurmd"):
        exe = tmp_path / name
        shutil.copy(shutil.which("sleep"), exe)
        decoys.append(subprocess.Popen([str(exe), "600"]))
    c = slurm.TestCluster()
    marker = "317.25"  # a sleep only the test job runs
    pids = {}
    try:
        c.start()
        pids = {d: int(c.pid_file(d).read_text()) for d in slurm.DAEMONS}
        sub = subprocess.run(["sbatch", "--parsable", "-t", "5", "--wrap", f"sleep {marker}", "-o", "/dev/null"],
                             env=c.env, capture_output=True, text=True, timeout=30)
        assert sub.returncode == 0, sub.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _procs_with(marker):
            time.sleep(0.2)
        assert _procs_with(marker), "the test job did not start\n" + c.tail("slurmctld")
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)
        alive_decoys = [p.poll() is None for p in decoys]
        for p in decoys:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert not any(slurm._pid_alive_as(pid, d) for d, pid in pids.items())
    assert all(alive_decoys), "stop() ended a process it did not start"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _procs_with(marker):
        time.sleep(0.2)
    assert not _procs_with(marker), "the running job outlived the cluster"


def _procs_with(arg: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if arg in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


# ---- the profile itself, read by Snakemake (a dry run: no cluster needed) ---------------------------------


def _dry_run_resources(tmp_path, attempt: int, env: dict) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "test_config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(), sort_keys=False))
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
        "--configfile", str(config), "--workflow-profile", str(SLURM_PROFILE), "--forceall", "--dry-run",
        "--attempt", str(attempt),
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INSTSIM_SLURM_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**clean, **env}, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = runs.parse_jobs(proc.stdout + "\n" + proc.stderr)
    assert jobs
    return {j.key: dict(kv.split("=", 1) for kv in j.resources.split(", ")) for j in jobs}


@pytest.fixture(scope="module")
def profile_settings():
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail("snakemake-executor-plugin-slurm is missing: pip install -e '.[slurm]'")
    return yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())


def test_profile_settings(profile_settings):
    p = profile_settings
    assert p["executor"] == "slurm" and p["jobs"] >= 1 and p["retries"] >= 1 and p["latency-wait"] >= 30
    assert p["rerun-incomplete"] is True
    assert "cores" not in p and "resources" not in p  # no global limits: the cluster schedules


def test_profile_account_partition_from_environment(tmp_path, profile_settings):
    plain = _dry_run_resources(tmp_path, 1, {})
    assert all("slurm_account" not in r and "slurm_partition" not in r for r in plain.values())
    named = _dry_run_resources(tmp_path, 1, {"INSTSIM_SLURM_ACCOUNT": "proj42", "INSTSIM_SLURM_PARTITION": "short"})
    assert all(r["slurm_account"] == "proj42" and r["slurm_partition"] == "short" for r in named.values())


def test_profile_default_resources_grow_on_retry(tmp_path, profile_settings):
    first, second = _dry_run_resources(tmp_path, 1, {}), _dry_run_resources(tmp_path / "b", 2, {})
    # `all` declares no resources of its own: it gets the profile's defaults.
    assert int(second[("all", "")]["mem_mb"]) == 2 * int(first[("all", "")]["mem_mb"])
    assert int(second[("all", "")]["runtime"]) == 2 * int(first[("all", "")]["runtime"])


def test_every_stage_asks_for_more_on_retry(tmp_path, profile_settings):
    first, second = _dry_run_resources(tmp_path, 1, {}), _dry_run_resources(tmp_path / "b", 2, {})
    same = sorted({rule for (rule, wc), r in first.items() if rule != "all"
                   and int(second[(rule, wc)]["mem_mb"]) <= int(r["mem_mb"])
                   and int(second[(rule, wc)]["runtime"]) <= int(r["runtime"])})
    assert not same, f"retried with the same memory and time: {same}"
