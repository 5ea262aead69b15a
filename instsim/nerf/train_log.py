"""``train_log.tsv`` of NeRF training (:data:`LOG_COLUMNS`, one row every ``log_every`` steps) and the clock that
times the training steps for it."""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io import atomic_path

__all__ = ["LOG_COLUMNS", "TrainClock", "TrainLog", "fmt_value"]

LOG_COLUMNS = ("step", "loss", "psnr", "rays_per_s", "occupied_fraction", "samples_per_ray", "rays", "lr", "elapsed_s")


class TrainLog:
    """Append-only training log; on resume, rows after the resumed step (from the killed run) are dropped."""

    def __init__(self, path: str | Path, resume_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[list[str]] = []
        if resume_step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.reader(f, delimiter="\t")
                header = next(reader, None)
                if header == list(LOG_COLUMNS):
                    rows = [r for r in reader if r and r[0].isdigit() and int(r[0]) <= resume_step]
        # rewritten atomically: a kill during the rewrite must not lose the rows before the resumed step
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(LOG_COLUMNS)
            w.writerows(rows)

    def write(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow([fmt_value(row[c]) for c in LOG_COLUMNS])


def fmt_value(v: Any) -> str:
    """A TSV cell: floats to 6 significant digits."""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class TrainClock:
    """Training time of this call, and the rays since the last log row; hook time is taken out of both."""

    def __init__(self) -> None:
        self.start = self.last_log = time.perf_counter()
        self.rays = 0

    def pause_since(self, t0: float) -> None:
        paused = time.perf_counter() - t0
        self.start += paused
        self.last_log += paused

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
