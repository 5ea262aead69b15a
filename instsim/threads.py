"""How many torch CPU threads a stage uses: as many as there are cores nobody else is using, re-checked while
it runs.

Why: torch's intra-op threads split every op across all of them and wait at the end of each op for the last
one. When another process holds one of the cores, the thread that shares that core runs only in the time
slices the scheduler gives it, and every one of the thousands of small ops of a NeRF or detector step waits
for it. Measured on a 2-core machine with one other busy process: 100 NeRF steps took 211.9 s with 2 threads
and 10.2 s with 1 (``benchmarks/bench_cpu_contention.py`` measures it again, old policy against this one).
A thread count fixed at the start of a stage is not enough either: the other work may start later.

The policy (:class:`ThreadGovernor`, used by every stage through :func:`instsim.stages.runner.run_stage`):

* the cores this process may run on (``os.sched_getaffinity``; ``taskset``, cgroups' cpusets and SLURM's
  ``--cpus-per-task`` restrict it) and at most the job's share, the rule's ``threads``;
* minus the cores that *other* processes keep busy: the busy time of those cores in ``/proc/stat`` over the
  last interval, less this process's own CPU time (``/proc/self/stat``), so a stage never counts its own
  threads as load;
* re-measured every :data:`CHECK_EVERY_S` seconds by a ``SIGALRM`` timer whose handler runs in the main thread
  between Python bytecodes, i.e. between torch ops, which is where ``torch.set_num_threads`` may be called.
  Every change is logged with the measurement behind it.

A thread count changes only float rounding order (the sum of a reduction over other chunks), never the
algorithm. Where ``/proc/stat`` cannot be read (not Linux) or the process is not in its main thread, the
count is fixed at the start: ``min(threads, cores of the affinity set)``, and the log says so.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "ThreadGovernor",
    "LoadSample",
    "available_cores",
    "busy_elsewhere",
    "choose_threads",
    "CHECK_EVERY_S",
    "FIRST_SAMPLE_S",
    "FREE_CORE_MARGIN",
]

log = logging.getLogger("instsim.threads")

#: seconds between two measurements of the other processes' load while a stage runs
CHECK_EVERY_S = 2.0
#: seconds of the first measurement, taken while the stage waits (before its work starts)
FIRST_SAMPLE_S = 0.25
#: a core counts as free only when other processes use less than this fraction of it: a thread on a core
#: that another process holds 30 % of the time still stalls every op it takes part in
FREE_CORE_MARGIN = 0.25

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available_cores() -> list[int]:
    """The CPU numbers this process may run on (its affinity set), sorted."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class LoadSample:
    """Cumulative counters at one moment: busy and total jiffies of each CPU of the affinity set, this
    process's CPU seconds (all threads), and the wall clock (s)."""

    busy: dict[int, int]
    total: dict[int, int]
    own_cpu_s: float
    wall_s: float


def _read_sample(cpus: list[int]) -> LoadSample | None:
    """A :class:`LoadSample` from ``/proc/stat`` and ``/proc/self/stat``, or None where they cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        with open("/proc/self/stat") as f:
            # fields after the ")" that ends the command name: utime and stime are the 12th and 13th
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    wanted = {f"cpu{c}": c for c in cpus}
    busy, total = {}, {}
    for line in lines:
        parts = line.split()
        if parts and parts[0] in wanted:
            # user nice system idle iowait irq softirq steal (guest time is already in user)
            vals = [int(v) for v in parts[1:9]]
            cpu = wanted[parts[0]]
            total[cpu] = sum(vals)
            busy[cpu] = total[cpu] - vals[3] - vals[4]
    if not total:
        return None
    own = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return LoadSample(busy, total, own, time.monotonic())


def busy_elsewhere(before: LoadSample, after: LoadSample) -> float:
    """Cores' worth of CPU time that other processes used on the affinity set between two samples: the
    cores' busy time less this process's own (>= 0)."""
    cores = [c for c in after.total if c in before.total]
    busy_s = sum(after.busy[c] - before.busy[c] for c in cores) / _CLK_TCK
    wall = sum(after.total[c] - before.total[c] for c in cores) / _CLK_TCK / max(1, len(cores))
    if wall <= 0:
        return 0.0
    own_s = after.own_cpu_s - before.own_cpu_s
    return max(0.0, (busy_s - own_s) / wall)


def choose_threads(max_threads: int, n_cores: int, busy_other: float) -> int:
    """Threads for a job allowed ``max_threads`` on ``n_cores`` cores of which other processes keep
    ``busy_other`` cores' worth busy: the free cores (a core with more than :data:`FREE_CORE_MARGIN` of
    other load is not free), at least 1, at most ``max_threads``."""
    free = n_cores - busy_other
    return max(1, min(int(max_threads), n_cores, int(math.floor(free + FREE_CORE_MARGIN))))


class ThreadGovernor:
    """Keeps ``torch.get_num_threads()`` at the number of free cores while active (see the module docstring).

    Use as a context manager around a stage's work::

        with ThreadGovernor(max_threads=snakemake.threads, log=log.info):
            train(...)

    On exit the timer is stopped, the previous ``SIGALRM`` handler and torch's thread count are restored.
    ``choices`` records ``(seconds since start, threads, other processes' load in cores)`` of every change.
    """

    def __init__(
        self,
        max_threads: int,
        *,
        check_every_s: float = CHECK_EVERY_S,
        first_sample_s: float = FIRST_SAMPLE_S,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.cpus = available_cores()
        self.max_threads = max(1, min(int(max_threads), len(self.cpus)))
        self.check_every_s = float(check_every_s)
        self.first_sample_s = float(first_sample_s)
        self._say = log or log_info
        self.choices: list[tuple[float, int, float]] = []
        self._old_threads: int | None = None
        self._old_handler = None
        self._timed = False
        self._last: LoadSample | None = None
        self._t0 = 0.0

    @property
    def threads(self) -> int:
        """The thread count chosen last."""
        return self.choices[-1][1] if self.choices else torch.get_num_threads()

    def _apply(self, n: int, busy: float | None, why: str) -> None:
        if self.choices and self.choices[-1][1] == n and torch.get_num_threads() == n:
            return
        torch.set_num_threads(n)
        self.choices.append((round(time.monotonic() - self._t0, 2), n, round(busy, 2) if busy is not None else -1.0))
        load = f"other processes use {busy:.2f} of {len(self.cpus)} cores" if busy is not None else why
        self._say(f"torch CPU threads: {n} (at most {self.max_threads}; {load})")

    def _check(self) -> None:
        now = _read_sample(self.cpus)
        if now is None or self._last is None:
            return
        if now.wall_s - self._last.wall_s < 0.05:  # too short to say anything
            return
        busy = busy_elsewhere(self._last, now)
        self._last = now
        self._apply(choose_threads(self.max_threads, len(self.cpus), busy), busy, "")

    def _on_alarm(self, signum, frame) -> None:  # runs in the main thread, between bytecodes
        self._check()

    def __enter__(self) -> "ThreadGovernor":
        self._t0 = time.monotonic()
        self._old_threads = torch.get_num_threads()
        first = _read_sample(self.cpus)
        in_main = threading.current_thread() is threading.main_thread()
        can_time = (
            first is not None
            and in_main
            and hasattr(signal, "setitimer")
            and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
            and self.max_threads > 1  # one thread allowed: nothing to choose
        )
        if first is None or self.max_threads == 1:
            why = "no /proc/stat to measure the load: fixed at the start" if first is None else "one core allowed"
            self._apply(self.max_threads, None, why)
            return self
        time.sleep(self.first_sample_s)
        self._last = first
        self._check()
        if can_time:
            self._old_handler = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.check_every_s, self.check_every_s)
            self._timed = True
        else:
            self._say("torch CPU threads fixed at the start (not in the main thread, or SIGALRM in use)")
        return self

    def __exit__(self, *exc) -> None:
        if self._timed:
            signal.setitimer(signal.ITIMER_REAL, 0.0, 0.0)
            signal.signal(signal.SIGALRM, self._old_handler if self._old_handler is not None else signal.SIG_DFL)
            self._timed = False
        if self._old_threads is not None:
            torch.set_num_threads(self._old_threads)


def log_info(msg: str) -> None:
    log.info(msg)
