"""Running a library function as a workflow stage: logging to the rule's log file and clean failures.

Workflow scripts are thin: they call :func:`run_stage` with a function of the ``snakemake`` object. A
user-fixable problem (:class:`~instsim.errors.InstsimError`) becomes one clear line in the log and on
stderr and a non-zero exit, instead of a traceback. A stage whose rule asks for a ``gpu`` resource first
claims a GPU of its own (:func:`instsim.gpus.claim_gpu`). Every stage runs its torch CPU work with as many
threads as the rule's ``threads`` allows and other processes leave free, re-checked while it runs
(:class:`instsim.threads.ThreadGovernor`; the log records each choice).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import InstsimError
from ..gpus import claim_gpu
from ..threads import ThreadGovernor

__all__ = ["run_stage", "setup_logging", "asks_for_gpu"]

log = logging.getLogger("instsim")


def setup_logging(log_path: str | Path | None, level: int = logging.INFO) -> None:
    """Send instsim's log records to ``log_path`` (if given) and to stderr, with timestamps."""
    # milliseconds: the GPU claims of parallel jobs are ordered from these lines (benchmarks/check_gpu_claims.py)
    fmt = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("instsim")
    root.setLevel(level)
    root.handlers.clear()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.propagate = False


def asks_for_gpu(snakemake: Any) -> bool:
    """Whether the job's rule asked the scheduler for a GPU (its ``gpu`` resource is 1 or more)."""
    return int(getattr(snakemake.resources, "gpu", 0) or 0) > 0


def run_stage(snakemake: Any, body: Callable[[Any], None]) -> None:
    """Run ``body(snakemake)`` with logging set up on ``snakemake.log[0]``; exit 1 on :class:`InstsimError`.

    A job with a ``gpu`` resource runs ``body`` holding a GPU of its own (see :mod:`instsim.gpus`); torch's CPU
    threads follow the free cores, at most the job's ``threads`` (see :mod:`instsim.threads`)."""
    log_path = snakemake.log[0] if len(snakemake.log) else None
    setup_logging(log_path)
    name = getattr(snakemake, "rule", "stage")
    start = time.perf_counter()
    log.info("%s: started (wildcards %s)", name, dict(snakemake.wildcards.items()))
    try:
        with claim_gpu() if asks_for_gpu(snakemake) else contextlib.nullcontext():
            with ThreadGovernor(max_threads=int(getattr(snakemake, "threads", 1) or 1), log=log.info):
                body(snakemake)
    except InstsimError as e:
        log.error("%s failed: %s", name, e)
        sys.exit(1)
    log.info("%s: done in %.1f s", name, time.perf_counter() - start)
