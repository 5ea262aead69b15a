"""Check from a finished run's stage logs how its GPU jobs used the host's GPUs (instsim.gpus.claim_gpu).

Each GPU stage's log (``<results>/logs/...``) has ``claimed GPU g of n (slot s of k; ...; waited w s)`` when
it got a GPU and ``released GPU g (slot s)`` when it let go (a job killed with SIGKILL has no release line: its
hold ends at the kill time from ``--kills``, else at its log's last line). From these intervals:

* ``balanced``: every claim went to a GPU with the fewest jobs at that moment (so concurrent jobs held
  distinct GPUs while a GPU was free), and no GPU ever held more than k jobs;
* ``no_idle_wait``: no job waited for a GPU while a slot on some GPU was free (1 s polling + 0.3 s of slack);
* ``kill_frees``: (with ``--kills``) each killed job's slot was free right after the kill (the probe the
  run script made) and a later claim got that GPU.

    python benchmarks/check_gpu_claims.py results_gpu --kills kills.jsonl --out claims.json

Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})"
CLAIM = re.compile(STAMP + r" .*claimed GPU (\S+) of (\d+) \(slot (\d+) of (\d+);.*waited ([0-9.]+) s\)")
RELEASE = re.compile(STAMP + r" .*released GPU (\S+) \(slot (\d+)\)")
ANY = re.compile(STAMP + r" ")
POLL_SLACK_S = 1.3


def _t(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def read_jobs(results: Path, kills: list[dict]) -> list[dict]:
    """One dict per GPU job that claimed: log, gpu, slot, n, k, waited, start, end, killed."""
    killed_logs = {k["log"]: k for k in kills}
    jobs = []
    for log in sorted((results / "logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        stamps = ANY.findall(text)
        for m in CLAIM.finditer(text):
            job = {"log": str(log.relative_to(results)), "gpu": m.group(2), "n": int(m.group(3)),
                   "slot": int(m.group(4)), "k": int(m.group(5)), "waited": float(m.group(6)),
                   "start": _t(m.group(1)), "end": None, "killed": False}
            rel = [r for r in RELEASE.finditer(text) if r.group(2) == job["gpu"] and int(r.group(3)) == job["slot"]]
            if rel:
                job["end"] = _t(rel[-1].group(1))
            elif job["log"] in killed_logs:
                job["end"], job["killed"] = float(killed_logs[job["log"]]["time"]), True
            else:
                job["end"] = _t(stamps[-1]) if stamps else job["start"]
            jobs.append(job)
    return jobs


def holders(jobs: list[dict], t: float, exclude: dict | None = None) -> dict[str, int]:
    """Jobs holding each GPU at time t (a job holds from its claim up to, not including, its end)."""
    count: dict[str, int] = {}
    for j in jobs:
        if j is not exclude and j["start"] <= t < j["end"]:
            count[j["gpu"]] = count.get(j["gpu"], 0) + 1
    return count


def check(jobs: list[dict], kills: list[dict]) -> dict:
    if not jobs:
        return {"jobs": 0, "passed": False, "problems": ["no GPU claims in the logs"]}
    n, k = jobs[0]["n"], jobs[0]["k"]
    used = {j["gpu"] for j in jobs}
    # GPUs by index where the claims name indices (a GPU nobody claimed still counts as idle)
    gpus = sorted(used | {str(i) for i in range(n)}) if all(g.isdigit() for g in used) else sorted(used)
    unbalanced, crowded, idle_waits, kill_problems = [], [], [], []
    peak = 0
    for j in jobs:
        before = holders(jobs, j["start"] - 1e-3, exclude=j)
        counts = {g: before.get(g, 0) for g in gpus}
        open_counts = [c for c in counts.values() if c < k]
        if open_counts and counts[j["gpu"]] > min(open_counts):
            unbalanced.append(f"{j['log']}: claimed GPU {j['gpu']} holding {counts[j['gpu']]} jobs while another "
                              f"held {min(open_counts)} ({counts})")
        now = holders(jobs, j["start"] + 1e-3)
        peak = max(peak, max(now.values()))
        if max(now.values()) > k:
            crowded.append(f"{j['log']}: a GPU held {max(now.values())} > {k} jobs ({now})")
        if j["waited"] > POLL_SLACK_S:
            t0, t1 = j["start"] - j["waited"] + 0.3, j["start"] - POLL_SLACK_S
            steps = max(2, int((t1 - t0) / 0.25))
            for i in range(steps + 1):
                t = t0 + (t1 - t0) * i / steps
                held = holders(jobs, t, exclude=j)
                free = [g for g in gpus if held.get(g, 0) < k]
                if free:
                    idle_waits.append(f"{j['log']}: waited for a GPU while GPU(s) {free} had a free slot "
                                      f"({held} at {t - j['start']:+.1f} s)")
                    break
    kill_results = []
    for kill in kills:
        later = [j for j in jobs if j["start"] > float(kill["time"]) and j["gpu"] == str(kill["gpu"])]
        ok = bool(kill.get("slot_free_after")) and bool(later)
        kill_results.append({**kill, "later_claims_on_that_gpu": len(later), "passed": ok})
        if not ok:
            kill_problems.append(f"killed job {kill['log']}: slot free after the kill: {kill.get('slot_free_after')}, "
                                 f"later claims of GPU {kill['gpu']}: {len(later)}")
    problems = unbalanced + crowded + idle_waits + kill_problems
    return {
        "jobs": len(jobs), "gpus": n, "jobs_per_gpu": k, "max_jobs_on_one_gpu": peak,
        "max_concurrent_gpu_jobs": max(sum(holders(jobs, j["start"] + 1e-3).values()) for j in jobs),
        "jobs_per_gpu_index": {g: sum(j["gpu"] == g for j in jobs) for g in gpus},
        "waits_over_1_s": sum(j["waited"] > POLL_SLACK_S for j in jobs),
        "kills": kill_results,
        "balanced": not unbalanced and not crowded,
        "no_idle_wait": not idle_waits,
        "kill_frees": (not kill_problems) if kills else None,
        "passed": not problems, "problems": problems,
    }


def stage_seconds(results: Path) -> dict[str, float]:
    """Snakemake's benchmark seconds per job (``<results>/benchmarks/<rule>/<wildcards>.tsv``, column ``s``)."""
    out = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        lines = tsv.read_text().splitlines()
        if len(lines) >= 2:
            head, row = lines[0].split("\t"), lines[-1].split("\t")
            out[str(tsv.relative_to(results / "benchmarks").with_suffix(""))] = round(float(row[head.index("s")]), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="the run's results folder (e.g. results_gpu)")
    ap.add_argument("--kills", type=Path, help="jsonl of the kills the run script made: log, time, gpu, slot, slot_free_after")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    kills = [json.loads(x) for x in args.kills.read_text().splitlines() if x.strip()] if args.kills and args.kills.exists() else []
    jobs = read_jobs(args.results, kills)
    result = check(jobs, kills)
    result["stage_seconds"] = stage_seconds(args.results)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "stage_seconds"}, indent=1))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
