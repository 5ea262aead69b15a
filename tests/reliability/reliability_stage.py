"""Run a workflow stage script (``workflow/scripts/<rule>.py``) without Snakemake, as Snakemake would.

Snakemake runs a ``script:`` with a global ``snakemake`` object (``input``, ``output``, ``params``, ``log``,
``wildcards``, ``resources``, ``threads``, ``rule``). :class:`FakeSnakemake` provides the parts the instsim scripts use, so
a stage's real code path (its :func:`~instsim.stages.runner.run_stage` wrapper included) runs in-process in well
under a second, and a test sees its exit status, its log and the files it left behind.
"""

from __future__ import annotations

import logging
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "workflow" / "scripts"


class Named(list):
    """A list of file paths (or values) that also answers by name, like Snakemake's ``Namedlist``.

    ``Named("a.json", out="b.json", views=["x", "y"])``: positional items first, then named ones; a named
    list is flattened into the list and returned whole by its name.
    """

    def __init__(self, *items: Any, **named: Any) -> None:
        flat = [str(i) if isinstance(i, Path) else i for i in items]
        self._named: dict[str, Any] = {}
        for key, value in named.items():
            if isinstance(value, (list, tuple)):
                value = [str(v) if isinstance(v, Path) else v for v in value]
                flat.extend(value)
            else:
                value = str(value) if isinstance(value, Path) else value
                flat.append(value)
            self._named[key] = value
        super().__init__(flat)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._named[name]
        except KeyError:
            raise AttributeError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return self._named.get(name, default)

    def items(self):
        return self._named.items()

    def keys(self):
        return self._named.keys()


@dataclass
class FakeSnakemake:
    """The ``snakemake`` object of one job."""

    rule: str
    input: Named = field(default_factory=Named)
    output: Named = field(default_factory=Named)
    params: Named = field(default_factory=Named)
    log: Named = field(default_factory=Named)
    wildcards: Named = field(default_factory=Named)
    resources: Named = field(default_factory=Named)  # no ``gpu``: the stage claims no GPU
    threads: int = 1


@dataclass
class StageResult:
    """What a stage run left: exit status (0 when it returned), the text of its log file, and the outputs."""

    exit_code: int
    log: str
    outputs: list[Path]

    def leftover_outputs(self) -> list[Path]:
        """Outputs that exist after the run (a failed stage must leave none)."""
        return [p for p in self.outputs if p.exists()]


def close_stage_log() -> None:
    """run_stage points instsim's logger at the job's log file; close it so the next stage starts clean."""
    logger = logging.getLogger("instsim")
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


def run_stage_script(script: str, sm: FakeSnakemake) -> StageResult:
    """Run ``workflow/scripts/<script>.py`` with ``sm`` as its ``snakemake`` global; a ``sys.exit`` becomes the
    exit code. Any other exception propagates (a stage that dies with a traceback is a bug the test shows)."""
    code = 0
    try:
        runpy.run_path(str(SCRIPTS / f"{script}.py"), init_globals={"snakemake": sm}, run_name="__snakemake__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        close_stage_log()
        sys.stderr.flush()
    log_path = Path(sm.log[0]) if len(sm.log) else None
    text = log_path.read_text() if log_path is not None and log_path.is_file() else ""
    outputs = [Path(p) for p in sm.output]
    return StageResult(code, text, outputs)


def stage_job(rule: str, results: Path, *, input: Mapping[str, Any] | None = None, output: Mapping[str, Any] | None = None,
              params: Mapping[str, Any] | None = None, wildcards: Mapping[str, str] | None = None,
              threads: int = 1) -> FakeSnakemake:
    """A job of ``rule`` with its log at ``results/logs/<rule>.log`` (named inputs, outputs and params)."""
    return FakeSnakemake(
        rule=rule,
        input=Named(**(input or {})),
        output=Named(**(output or {})),
        params=Named(**(params or {})),
        log=Named(results / "logs" / f"{rule}.log"),
        wildcards=Named(**(wildcards or {})),
        threads=threads,
    )
