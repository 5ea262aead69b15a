"""Report plots of a Neural-Sim run: probabilities over iterations, learned vs target distribution, and the
learned run beside its control (psi frozen).

All functions read the ``trajectory.tsv`` / ``distribution.json`` contents (pandas frames and dicts), so
they also work on finished runs without the models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .report import pyplot, save_figure

__all__ = ["plot_control_comparison", "plot_learned_vs_target", "plot_probabilities", "read_trajectory", "tv_per_factor"]


def read_trajectory(path: str | Path) -> pd.DataFrame:
    """``trajectory.tsv`` as a frame (empty cells are NaN)."""
    return pd.read_csv(path, sep="\t")



def _learned_columns(df: pd.DataFrame, cls: str) -> list[tuple[str, int, str]]:
    """``[(factor, bin, column)]`` of class ``cls`` in column order."""
    out = []
    prefix = f"p_{cls}_"
    for col in df.columns:
        if col.startswith(prefix):
            factor, b = col[len(prefix):].rsplit("_", 1)
            out.append((factor, int(b), col))
    return out


def plot_probabilities(
    df: pd.DataFrame,
    classes: Sequence[str],
    path: str | Path,
    target: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Heatmap per class: rows are the bins of the learned factors, columns the iterations, colour the
    probability; a last column (right of a gap) shows the target distribution when given."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(classes), figsize=(1.5 + 4.2 * len(classes), 4.6), squeeze=False)
    iters = df["iteration"].to_numpy()
    im = None
    for ax, cls in zip(axes[0], classes):
        cols = _learned_columns(df, cls)
        mat = df[[c for _, _, c in cols]].to_numpy(dtype=float).T  # (rows, iterations)
        labels = [f"{f} {b}" for f, b, _ in cols]
        if target is not None:
            tcol = np.array([float(target[f][b]) for f, b, _ in cols])[:, None]
            gap = np.full((len(cols), 1), np.nan)
            mat = np.concatenate([mat, gap, tcol], axis=1)
        vmax = max(float(np.nanmax(mat)), 1e-6)
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax)
        ticks = np.linspace(0, len(iters) - 1, min(len(iters), 6)).round().astype(int)
        xt, xl = list(ticks), [str(int(iters[t])) for t in ticks]
        if target is not None:
            xt.append(len(iters) + 1)
            xl.append("target")
        ax.set_xticks(xt, xl)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        # separators between factors
        prev = None
        for r, (f, _, _) in enumerate(cols):
            if prev is not None and f != prev:
                ax.axhline(r - 0.5, color="white", lw=1.5)
            prev = f
        ax.set_title(cls)
        ax.set_xlabel("iteration")
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="probability")
    fig.suptitle("Neural-Sim: pose-bin probabilities over iterations")
    fig.tight_layout()
    save_figure(fig, path)


def plot_learned_vs_target(
    learned: Mapping[str, Any],
    path: str | Path,
    target: Mapping[str, Sequence[float]] | None = None,
    initial: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> None:
    """Bars per class (rows) and learned factor (columns): initial, learned and (when known) target
    probability per bin. ``learned`` is a ``distribution.json`` dict."""
    plt = pyplot()
    classes = list(learned["classes"])
    factors = list(learned.get("learned") or next(iter(learned["classes"].values())).keys())
    fig, axes = plt.subplots(len(classes), len(factors), figsize=(1.0 + 3.4 * len(factors), 0.6 + 2.2 * len(classes)),
                             squeeze=False)
    for i, cls in enumerate(classes):
        for j, f in enumerate(factors):
            ax = axes[i, j]
            p = np.asarray(learned["classes"][cls][f], dtype=float)
            x = np.arange(len(p))
            series = []
            if initial is not None:
                series.append(("initial", np.asarray(initial[cls][f], dtype=float), "#bbbbbb"))
            series.append(("learned", p, "#1f77b4"))
            if target is not None:
                series.append(("target", np.asarray(target[f], dtype=float), "#ff7f0e"))
            w = 0.8 / len(series)
            for k, (name, vals, colour) in enumerate(series):
                ax.bar(x + (k - (len(series) - 1) / 2) * w, vals, w, label=name, color=colour)
            ax.set_xticks(x)
            ax.set_ylim(0, 1)
            if i == 0:
                ax.set_title(f)
            if j == 0:
                ax.set_ylabel(f"{cls}\nprobability")
            if i == len(classes) - 1:
                ax.set_xlabel("bin")
    axes[0, -1].legend(loc="upper right", fontsize=7)
    fig.suptitle("Neural-Sim: learned vs target pose distribution")
    fig.tight_layout()
    save_figure(fig, path)


def tv_per_factor(df: pd.DataFrame, target: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """``{factor: (iterations,)}``: the TV distance to ``target`` of each learned factor over the iterations of a
    ``trajectory.tsv`` frame, the mean over classes (from its ``p_<cls>_<factor>_<bin>`` columns)."""
    per: dict[str, list[np.ndarray]] = {}
    classes = sorted({c[2:].rsplit("_", 2)[0] for c in df.columns if c.startswith("p_")})
    for cls in classes:
        by_factor: dict[str, list[str]] = {}
        for factor, _, col in _learned_columns(df, cls):
            by_factor.setdefault(factor, []).append(col)
        for factor, cols in by_factor.items():
            p = df[cols].to_numpy(dtype=float)
            t = np.asarray(target[factor], dtype=float)[None, :]
            per.setdefault(factor, []).append(0.5 * np.abs(p - t).sum(axis=1))
    return {f: np.mean(v, axis=0) for f, v in per.items()}


def plot_control_comparison(learned: pd.DataFrame, control: pd.DataFrame, path: str | Path,
                            target: Mapping[str, Sequence[float]] | None = None) -> None:
    """Validation loss, validation AP and TV to the target over iterations, for the learned run and the
    control (same loop, psi frozen): a gain of the learned run over the control is the optimization's, not the
    extra fine-tuning's. With the ``target`` distribution, one more panel per learned factor: that factor's TV
    (mean over classes) for the learned run, the control and the uniform distribution."""
    plt = pyplot()
    panels = [("val_loss", "validation loss (target/val)"), ("val_AP", "COCO AP (target/val)"),
              ("tv_to_target", "TV distance to target (learned factors)")]
    factor_tv = {}
    if target is not None:
        learned_tv, control_tv = tv_per_factor(learned, target), tv_per_factor(control, target)
        factor_tv = {f: (learned_tv[f], control_tv.get(f)) for f in learned_tv}
    n = len(panels) + len(factor_tv)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.4), squeeze=False)
    axes = axes[0]
    for ax, (col, label) in zip(axes, panels):
        for name, df, style in (("psi learned", learned, "-"), ("control: psi frozen", control, "--")):
            if col not in df or df[col].isna().all():
                continue
            d = df[["iteration", col]].dropna()
            ax.plot(d["iteration"], d[col], style, marker="o" if col == "val_AP" else None, ms=3, label=name)
        ax.set_xlabel("iteration")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    for ax, (factor, (tv_l, tv_c)) in zip(axes[len(panels):], factor_tv.items()):
        ax.plot(learned["iteration"], tv_l, "-", label="psi learned")
        if tv_c is not None:
            ax.plot(control["iteration"], tv_c, "--", label="control: psi frozen")
        bins = len(target[factor])
        uniform = 0.5 * float(np.abs(np.full(bins, 1.0 / bins) - np.asarray(target[factor], dtype=float)).sum())
        ax.axhline(uniform, color="grey", ls=":", label="uniform")
        ax.set_xlabel("iteration")
        ax.set_title(f"TV to target: {factor}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].legend()
    fig.suptitle("Neural-Sim vs its control (same samples and fine-tuning, no psi update) and uniform")
    fig.tight_layout()
    save_figure(fig, path)
