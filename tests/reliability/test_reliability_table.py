"""``docs/reliability.md`` tells the truth: its bad-input rows are the catalogue's rows, and each fault and
determinism row has the test that checks it (``test_fault_<id>``, ``test_determinism_<id>``)."""

from __future__ import annotations

import re

import test_determinism
import test_faults
from conftest import REPO
from reliability_cases import CASE_IDS, table_rows

DOC = REPO / "docs" / "reliability.md"


def _sections() -> dict[str, list[str]]:
    """Table rows (``| `id` | ...``) by the ``##`` section they are in."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        elif line.startswith("| `"):
            sections.setdefault(current, []).append(line)
    return sections


def _ids(rows: list[str]) -> list[str]:
    return [re.match(r"\| `([^`]+)` \|", r).group(1) for r in rows]


def _tested(module, prefix: str) -> set[str]:
    return {name[len(prefix):].replace("_", "-") for name in dir(module) if name.startswith(prefix)}


def _norm(row: str) -> str:
    return re.sub(r"\s+", " ", row.strip())


def test_bad_input_rows_are_the_catalogue():
    rows = _sections()["Bad inputs"]
    assert len(CASE_IDS) >= 20 and len(set(CASE_IDS)) == len(CASE_IDS)
    assert _ids(rows) == CASE_IDS
    assert [_norm(r) for r in rows] == [_norm(r) for r in table_rows()], (
        "docs/reliability.md is out of date: replace its bad-input rows with the output of "
        "`python tests/reliability/reliability_cases.py`"
    )


def test_every_fault_row_has_its_test():
    assert set(_ids(_sections()["Faults"])) == _tested(test_faults, "test_fault_")


def test_every_determinism_row_has_its_test():
    assert set(_ids(_sections()["Determinism"])) == _tested(test_determinism, "test_determinism_")
