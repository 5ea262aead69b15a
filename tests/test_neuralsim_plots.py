"""Report plots of a Neural-Sim run (instsim.stages.neuralsim_plots): the per-factor TV of the learned run, the control
and uniform."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from instsim.stages.neuralsim_plots import plot_control_comparison, tv_per_factor

TARGET = {"azimuth": [0.7, 0.1, 0.1, 0.1], "zoom": [0.5, 0.5]}


def _trajectory(p_az0: list[float]) -> pd.DataFrame:
    rows = []
    for i, p in enumerate(p_az0):
        row = {"iteration": i, "val_loss": 1.0 - 0.01 * i, "val_AP": np.nan, "tv_to_target": np.nan}
        for cls in ("my_hand", "palm"):  # a class name with an underscore
            rest = (1 - p) / 3
            row.update({f"p_{cls}_azimuth_0": p, f"p_{cls}_azimuth_1": rest, f"p_{cls}_azimuth_2": rest,
                        f"p_{cls}_azimuth_3": rest, f"p_{cls}_zoom_0": 0.5, f"p_{cls}_zoom_1": 0.5})
        rows.append(row)
    return pd.DataFrame(rows)


def test_tv_per_factor_and_the_comparison_plot(tmp_path):
    learned, control = _trajectory([0.25, 0.5, 0.7]), _trajectory([0.25, 0.25, 0.25])
    tv = tv_per_factor(learned, TARGET)
    assert set(tv) == {"azimuth", "zoom"}
    assert tv["azimuth"] == pytest.approx([0.45, 0.2, 0.0]) and tv["zoom"] == pytest.approx([0.0, 0.0, 0.0])
    assert tv_per_factor(control, TARGET)["azimuth"] == pytest.approx([0.45] * 3)  # the control stays at uniform's
    out = tmp_path / "control_comparison.png"
    plot_control_comparison(learned, control, out, target=TARGET)
    assert out.stat().st_size > 1000
