"""Style gates of the workflow files: `snakefmt --check` is clean, and `snakemake --lint` reports nothing but
its request for a conda environment or container per rule (instsim runs in one Python environment, installed
with pip; see README)."""

import re
import subprocess
import sys

from conftest import REPO

# The one lint the workflow keeps on purpose, as Snakemake titles it.
ALLOWED_LINT = "Specify a conda environment or container for each rule."

_SECTION = re.compile(r"^Lints for (.+):$")
_TITLE = re.compile(r"^\s+\* (.+?):?$")


def lint_findings(text: str) -> list[tuple[str, str, str]]:
    """(where, lint title, the lint's text) for each lint in `snakemake --lint`'s text output."""
    findings: list[tuple[str, str, str]] = []
    where = None
    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            where = section.group(1)
            continue
        title = _TITLE.match(line)
        if where is not None and title:
            findings.append((where, title.group(1), line.strip()))
        elif findings and where is not None and line.startswith("      "):
            w, t, body = findings[-1]
            findings[-1] = (w, t, body + "\n" + line.strip())
    return findings


def test_snakefmt_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--diff", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "snakefmt would reformat (run `snakefmt .`):\n" + (proc.stdout + proc.stderr)[-5000:]


def test_snakemake_lint_only_asks_for_conda_or_container(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config.yaml"), "--lint"],
        capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + "\n" + proc.stderr
    findings = lint_findings(out)
    # No rule has a conda/container directive, so that lint must be there: proves the output was parsed.
    assert any(title == ALLOWED_LINT for _, title, _ in findings), out[-3000:]
    others = [f"{where}: {body}" for where, title, body in findings if title != ALLOWED_LINT]
    assert not others, "snakemake --lint:\n" + "\n\n".join(others)
    if proc.returncode != 0:  # --lint exits 1 when it has anything to say; it must not be another error
        assert "Lints for" in out and "Error" not in out, out[-3000:]


def test_lint_parser_reports_other_lints():
    """The parser catches lints other than the allowed one, with their text (else the gate could not fail)."""
    text = """Lints for snakefile /repo/Snakefile:
    * Absolute path "/data" in line 3:
      Do not define absolute paths inside of the workflow.

Lints for rule train_nerf (line 4, /repo/workflow/rules/nerf.smk):
    * Specify a conda environment or container for each rule.:
      This way, the used software for each specific step is documented.
    * No log directive defined:
      Without a log directive, all output will be printed to the terminal.
"""
    found = lint_findings(text)
    assert [t for _, t, _ in found] == ['Absolute path "/data" in line 3', ALLOWED_LINT, "No log directive defined"]
    assert found[0][0] == "snakefile /repo/Snakefile" and "Do not define absolute paths" in found[0][2]
