"""The stage thread policy (instsim.threads): the choice from a load measurement, the measurement itself
(other processes' CPU time, not this process's), and the governor that re-checks while a stage runs. The
load is faked (a scripted sequence of /proc/stat samples), so the tests do not depend on what else the
machine is doing."""

import time

import pytest
import torch

from instsim import threads
from instsim.threads import LoadSample, ThreadGovernor, busy_elsewhere, choose_threads

TICK = threads._CLK_TCK


@pytest.mark.parametrize(
    "max_threads, cores, busy, expected",
    [(2, 2, 0.0, 2), (2, 2, 0.2, 2), (2, 2, 0.3, 1), (2, 2, 1.0, 1), (2, 2, 2.0, 1), (4, 16, 3.0, 4),
     (8, 16, 10.5, 5), (1, 16, 0.0, 1), (2, 1, 0.0, 1)],
)
def test_threads_follow_the_free_cores(max_threads, cores, busy, expected):
    assert choose_threads(max_threads, cores, busy) == expected


def _sample(t: float, busy_per_cpu: list[float], own_s: float) -> LoadSample:
    """Counters at time ``t`` s of CPUs that have been busy ``busy_per_cpu`` of the time since 0."""
    return LoadSample({c: int(b * t * TICK) for c, b in enumerate(busy_per_cpu)},
                      {c: int(t * TICK) for c in range(len(busy_per_cpu))}, own_s, t)


def test_own_cpu_time_is_not_counted_as_load():
    # 2 cores, both fully busy for 10 s, of which this process used 10 s (one core's worth): one core's
    # worth is someone else's
    assert busy_elsewhere(_sample(0, [1, 1], 0.0), _sample(10, [1, 1], 10.0)) == pytest.approx(1.0)
    # only this process keeps them busy: no load elsewhere
    assert busy_elsewhere(_sample(0, [1, 1], 0.0), _sample(10, [1, 1], 20.0)) == pytest.approx(0.0)
    assert busy_elsewhere(_sample(0, [0, 0], 0.0), _sample(10, [0, 0], 0.0)) == 0.0


def test_the_real_counters_can_be_read():
    sample = threads._read_sample(threads.available_cores())
    if sample is None:
        pytest.skip("no /proc/stat here")
    assert set(sample.total) == set(threads.available_cores())
    assert all(0 <= sample.busy[c] <= sample.total[c] for c in sample.total)


class _Script:
    """Fake samples: ``load(t)`` gives the other processes' load (cores) at wall time t (s since start)."""

    def __init__(self, cores: int, load):
        self.cores, self.load, self.t0 = cores, load, time.monotonic()
        self.busy = 0.0

    def __call__(self, cpus):
        t = time.monotonic() - self.t0
        # cumulative busy jiffies grow at the load's rate; this process's own time is 0 (it only sleeps)
        self.busy = max(self.busy, self.load(t) * t)
        per = self.busy / self.cores
        return LoadSample({c: int(per * TICK * 1000) for c in range(self.cores)},
                          {c: int(t * TICK * 1000) for c in range(self.cores)}, 0.0, t)


def test_governor_drops_a_thread_when_another_process_starts_and_restores_on_exit(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: [0, 1])
    # idle for the first 0.4 s, then one other process keeps a core busy
    script = _Script(2, lambda t: 0.0 if t < 0.4 else 1.0)
    monkeypatch.setattr(threads, "_read_sample", script)
    before = torch.get_num_threads()
    seen = []
    with ThreadGovernor(max_threads=2, check_every_s=0.1, first_sample_s=0.05, log=seen.append) as gov:
        assert torch.get_num_threads() == 2
        deadline = time.monotonic() + 5
        while torch.get_num_threads() != 1 and time.monotonic() < deadline:
            sum(range(10000))  # Python work: the alarm handler runs between bytecodes
        assert torch.get_num_threads() == 1
    assert [n for _, n, _ in gov.choices] == [2, 1]
    assert "torch CPU threads: 1" in seen[-1] and "other processes use" in seen[-1]
    assert torch.get_num_threads() == before
    import signal

    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_governor_without_counters_keeps_the_allowed_threads(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: [0, 1, 2])
    monkeypatch.setattr(threads, "_read_sample", lambda cpus: None)
    seen = []
    before = torch.get_num_threads()
    with ThreadGovernor(max_threads=2, log=seen.append):
        assert torch.get_num_threads() == 2
    assert "no /proc/stat" in seen[0]
    assert torch.get_num_threads() == before
