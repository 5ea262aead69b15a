"""``trajectory.tsv``: one row per outer iteration of Neural-Sim (row 0: the state before the loop).

Columns: :data:`BASE_COLUMNS`, then ``p_<cls>_<factor>_<bin>``, the probabilities of the learned factors after
the iteration's update. Empty cells are values not computed (e.g. ``val_AP`` between evaluations).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path
from .distribution import PoseDistribution

__all__ = ["BASE_COLUMNS", "flatten_row", "psi_state", "trajectory_columns", "write_trajectory"]

BASE_COLUMNS = ("iteration", "val_loss", "val_AP", "grad_norm", "tv_to_target", "train_loss", "v_norm", "u_norm", "n_images",
                "seconds", "hypergrad_seconds", "lambda_max", "hvp_alpha")


def trajectory_columns(dist: PoseDistribution) -> list[str]:
    """``trajectory.tsv``'s columns: :data:`BASE_COLUMNS`, then ``p_<cls>_<factor>_<bin>`` of the learned
    factors (every class, factor and bin)."""
    cols = list(BASE_COLUMNS)
    for c in dist.classes:
        for f in dist.learned:
            cols += [f"p_{c}_{f}_{b}" for b in range(dist.space.factor(f).bins)]
    return cols


def psi_state(dist: PoseDistribution, target_probs: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    """``{"tv_to_target": mean TV over classes (None without a target), "probs": {cls: {factor: [p...]}}}`` of
    the learned factors."""
    with torch.no_grad():
        probs = {c: {f: [float(x) for x in p.detach().cpu().double()] for f, p in dist.probs(c).items() if f in dist.learned}
                 for c in dist.classes}
    tv = dist.tv_to(target_probs)["mean"] if target_probs is not None else None
    return {"tv_to_target": tv, "probs": probs}


def flatten_row(iteration: int, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row of :func:`~instsim.neuralsim.step.outer_step` as ``{column: value}``."""
    out = {"iteration": iteration}
    for k in BASE_COLUMNS[1:]:
        out[k] = row.get(k)
    for c, per in row["probs"].items():
        for f, ps in per.items():
            for b, p in enumerate(ps):
                out[f"p_{c}_{f}_{b}"] = p
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_trajectory(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` as a TSV with ``columns`` (missing values empty), atomically."""
    lines = ["\t".join(columns)] + ["\t".join(_fmt(r.get(c)) for c in columns) for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
