"""Every bad input of the catalogue (:mod:`reliability_cases`): a non-zero exit, a message naming the file and the
field or value at fault, and no output that looks finished."""

from __future__ import annotations

import pytest

from reliability_cases import CASES, Case


# thousands of small ops on two shared cores: one torch thread per test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_clearly_and_leaves_no_output(case: Case, tmp_path):
    out = case.run(tmp_path)
    assert out.exit_code != 0, f"{case.id}: exit 0\n{out.message[-3000:]}"
    missing = [f for f in case.expect if f not in out.message]
    assert not missing, f"{case.id}: message lacks {missing}:\n{out.message[-3000:]}"
    assert "Traceback" not in out.message or case.entry == "snakemake", f"{case.id}: a traceback, not a clear message"
    left = [str(p) for p in out.outputs if p.exists()]
    assert not left, f"{case.id}: outputs left behind: {left}"
