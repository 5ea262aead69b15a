"""Helpers for tests that compare whole workflow runs: the jobs Snakemake printed and the files under results/.
(The local run of configs/tiny.yaml they compare against is conftest.py's session fixture `tiny_run`.)"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Files whose content is a record of how a run went rather than what it computed.
SKIP_CONTENT_DIRS = ("logs", "benchmarks")
# Keys (json) and columns (tsv) that hold timings, rates, dates or hosts: split on "_", any of these parts.
VOLATILE_PARTS = {"time", "times", "elapsed", "duration", "seconds", "secs", "timestamp", "date", "host", "hostname", "pid"}
VOLATILE_SUFFIXES = ("per_s", "per_sec", "per_second")
REL_TOL, ABS_TOL = 1e-6, 1e-9


@dataclass
class Job:
    """One job as Snakemake prints it (run or dry run): rule, wildcards and its files."""

    rule: str
    local: bool = False  # printed as `localrule`: runs in the main Snakemake process, never submitted
    wildcards: str = ""
    input: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    benchmark: list[str] = field(default_factory=list)
    resources: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.rule, self.wildcards

    @property
    def files(self) -> list[str]:
        """Everything the job writes: outputs, logs, benchmarks."""
        return [*self.output, *self.log, *self.benchmark]


_JOB_START = re.compile(r"^(local)?rule (\w+):\s*$")
_JOB_FIELD = re.compile(r"^\s+(input|output|log|benchmark|wildcards|resources): (.*)$")


def parse_jobs(text: str) -> list[Job]:
    """The jobs in Snakemake's printed output, in the order printed."""
    jobs: list[Job] = []
    current: Job | None = None
    for line in text.splitlines():
        start = _JOB_START.match(line)
        if start:
            current = Job(start.group(2), local=bool(start.group(1)))
            jobs.append(current)
            continue
        if current is None:
            continue
        fld = _JOB_FIELD.match(line)
        if fld:
            name, value = fld.groups()
            if name in ("wildcards", "resources"):
                setattr(current, name, value.strip())
            else:
                setattr(current, name, [v.strip() for v in value.split(", ") if v.strip()])
        elif not line.startswith((" ", "\t")):
            current = None
    return jobs


def planned_jobs(workdir: Path, config_path: Path) -> list[Job]:
    """Every job of the workflow in `workdir` with its files, from a dry run with --forceall (nothing runs)."""
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(config_path), "--cores", "1", "--forceall", "--dry-run",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = parse_jobs(proc.stdout + "\n" + proc.stderr)
    assert jobs, proc.stdout[-3000:] + proc.stderr[-3000:]
    return jobs


def dependants(jobs: list[Job], roots: list[Job]) -> list[Job]:
    """`roots` and every job that needs, directly or not, a file (or a file inside a folder) they write."""

    def needs(job: Job, outputs: set[str]) -> bool:
        return any(i in outputs or any(i.startswith(o + "/") for o in outputs) for i in job.input)

    chosen = {j.key: j for j in roots}
    changed = True
    while changed:
        changed = False
        outputs = {o for j in chosen.values() for o in j.output}
        for job in jobs:
            if job.key not in chosen and needs(job, outputs):
                chosen[job.key] = job
                changed = True
    return list(chosen.values())


def result_files(workdir: Path, results_dir: str = "results") -> dict[str, int]:
    """Relative path -> mtime (ns) of every file (or link) under `workdir/results_dir`."""
    root = workdir / results_dir
    return {
        str(p.relative_to(workdir)): p.lstat().st_mtime_ns
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def files_of(jobs: list[Job], workdir: Path) -> set[str]:
    """The files the jobs write, with the files inside folder outputs."""
    out: set[str] = set()
    for job in jobs:
        for f in job.files:
            path = workdir / f
            if path.is_dir():
                out.update(str(p.relative_to(workdir)) for p in path.rglob("*") if p.is_file() or p.is_symlink())
            else:
                out.add(f)
    return out


def _volatile(name: str) -> bool:
    name = str(name).lower()
    return bool(VOLATILE_PARTS.intersection(name.split("_"))) or name.endswith(VOLATILE_SUFFIXES)


def _same(a, b, where: str, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        keys_a = {k for k in a if not _volatile(k)}
        keys_b = {k for k in b if not _volatile(k)}
        if keys_a != keys_b:
            diffs.append(f"{where}: keys differ: {sorted(keys_a ^ keys_b)}")
        for k in sorted(keys_a & keys_b):
            _same(a[k], b[k], f"{where}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", diffs)
    elif isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and (
            math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL) or (math.isnan(a) and math.isnan(b))
        )
        if not ok:
            diffs.append(f"{where}: {a!r} vs {b!r}")
    elif a != b:
        diffs.append(f"{where}: {a!r} vs {b!r}")


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _tsv(path: Path) -> dict:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t") if lines else []
    rows = [dict(zip(header, map(_number, line.split("\t")))) for line in lines[1:]]
    return {"columns": [h for h in header if not _volatile(h)], "rows": rows}


def compare_results(a: Path, b: Path, results_dir: str = "results") -> tuple[list[str], list[str]]:
    """Differences between two runs' results: the same files must exist, and every .json and .tsv file
    outside logs/ and benchmarks/ must hold the same content (floats to 1e-6, timing fields ignored).
    Returns (differences, the files whose content was compared)."""
    files_a, files_b = set(result_files(a, results_dir)), set(result_files(b, results_dir))
    diffs = [f"only in {a}: {f}" for f in sorted(files_a - files_b)]
    diffs += [f"only in {b}: {f}" for f in sorted(files_b - files_a)]
    compared = []
    for rel in sorted(files_a & files_b):
        parts = Path(rel).parts
        if len(parts) > 1 and parts[1] in SKIP_CONTENT_DIRS:
            continue
        if rel.endswith(".json"):
            load = lambda p: json.loads(p.read_text())  # noqa: E731
        elif rel.endswith(".tsv"):
            load = _tsv
        else:
            continue
        compared.append(rel)
        _same(load(a / rel), load(b / rel), rel, diffs)
    return diffs, compared
