"""The ``summarize`` stage: the results table and the plots of the Snakemake report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..io import atomic_path, read_image, read_json, to_uint8, write_png

__all__ = ["summary_table", "plot_ap", "plot_per_class", "draw_boxes", "image_grid", "predictions_grid"]

#: colours of drawn boxes: ground truth, then predictions per class id (1-based)
GT_COLOUR = (255, 255, 255)
CLASS_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def summary_table(evals: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (strategy, seed) with AP, AP50, AP75 and per-class AP (COCO, in [0, 1]), followed by a
    ``mean`` and a ``std`` row per strategy (``seed`` column holds ``mean``/``std``)."""
    rows = []
    for ev in evals:
        row = {"strategy": ev["strategy"], "seed": str(ev["seed"]), "AP": ev["AP"], "AP50": ev["AP50"], "AP75": ev["AP75"]}
        for name, pc in sorted(ev["per_class"].items()):
            row[f"AP_{name}"] = pc["AP"]
        rows.append(row)
    df = pd.DataFrame(rows)
    metric_cols = [c for c in df.columns if c.startswith("AP")]
    stats = []
    for strategy, group in df.groupby("strategy", sort=False):
        vals = group[metric_cols].astype(float)
        stats.append({"strategy": strategy, "seed": "mean", **vals.mean().to_dict()})
        stats.append({"strategy": strategy, "seed": "std", **vals.std(ddof=0).to_dict()})
    return pd.concat([df, pd.DataFrame(stats)], ignore_index=True)


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (stages run without a display).

    Imported here, not at the top: matplotlib takes ~0.3 s to import and only the plotting stages need it,
    and the backend must be chosen before pyplot is first imported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` atomically to ``path`` (the suffix picks the format) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def plot_ap(table: pd.DataFrame, path: str | Path) -> None:
    """Bar chart of mean AP and AP50 per strategy with ± std error bars (over seeds)."""
    plt = pyplot()

    mean = table[table.seed == "mean"].set_index("strategy")
    std = table[table.seed == "std"].set_index("strategy")
    x = np.arange(len(mean))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(mean), 3.2))
    for k, metric in enumerate(("AP", "AP50")):
        ax.bar(x + (k - 0.5) * 0.38, mean[metric], 0.38, yerr=std[metric], capsize=4, label=metric)
    ax.set_xticks(x, mean.index)
    ax.set_ylim(0, 1)
    ax.set_ylabel("COCO AP on target/test")
    ax.legend(loc="upper left")
    ax.set_title("Detector trained on NeRF renders, per strategy (mean ± std over seeds)")
    save_figure(fig, path)


def plot_per_class(table: pd.DataFrame, path: str | Path) -> None:
    """Grouped bars of mean per-class AP per strategy."""
    plt = pyplot()

    mean = table[table.seed == "mean"].set_index("strategy")
    cols = [c for c in mean.columns if c.startswith("AP_")]
    x = np.arange(len(cols))
    width = 0.8 / max(1, len(mean))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(cols), 3.2))
    for k, (strategy, row) in enumerate(mean.iterrows()):
        ax.bar(x + (k - (len(mean) - 1) / 2) * width, row[cols].astype(float), width, label=strategy)
    ax.set_xticks(x, [c[3:] for c in cols])
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP (mean over seeds)")
    ax.legend()
    save_figure(fig, path)


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]], colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Draw 1-pixel box outlines (COCO xywh, pixels) on a copy of an ``(H, W, 3)`` uint8 image."""
    out = image.copy()
    h, w = out.shape[:2]
    for (x, y, bw, bh), colour in zip(boxes, colours):
        x0, y0 = int(np.clip(round(x), 0, w - 1)), int(np.clip(round(y), 0, h - 1))
        x1, y1 = int(np.clip(round(x + bw) - 1, 0, w - 1)), int(np.clip(round(y + bh) - 1, 0, h - 1))
        out[y0, x0 : x1 + 1] = colour
        out[y1, x0 : x1 + 1] = colour
        out[y0 : y1 + 1, x0] = colour
        out[y0 : y1 + 1, x1] = colour
    return out


def image_grid(images: Sequence[np.ndarray], columns: int, scale: int = 2, pad: int = 2) -> np.ndarray:
    """Tile equal-size ``(H, W, 3)`` uint8 images into a grid (nearest-neighbour upscaled by ``scale``)."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad, 3), 40, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        big = img.repeat(scale, 0).repeat(scale, 1)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        grid[y : y + h * scale, x : x + w * scale] = big
    return grid


def predictions_grid(
    coco: Mapping, detections: Sequence[Mapping], images_dir: str | Path, n: int = 12, min_score: float = 0.3
) -> np.ndarray:
    """The first ``n`` test images with true boxes (white) and predictions above ``min_score`` (class colours)."""
    imgs = []
    for img in coco["images"][:n]:
        arr = to_uint8(read_image(Path(images_dir) / img["file_name"])[..., :3])
        gt = [a["bbox"] for a in coco["annotations"] if a["image_id"] == img["id"]]
        pred = [d for d in detections if d["image_id"] == img["id"] and d["score"] >= min_score]
        arr = draw_boxes(arr, gt, [GT_COLOUR] * len(gt))
        arr = draw_boxes(arr, [d["bbox"] for d in pred], [CLASS_COLOURS[(d["category_id"] - 1) % len(CLASS_COLOURS)] for d in pred])
        imgs.append(arr)
    return image_grid(imgs, columns=min(6, len(imgs)))


def write_predictions_grid(coco_path: str | Path, detections_path: str | Path, images_dir: str | Path, out: str | Path) -> None:
    """:func:`predictions_grid` from files, written as PNG."""
    write_png(out, predictions_grid(read_json(coco_path), read_json(detections_path), images_dir))
