"""Image metrics for NeRF validation: PSNR, SSIM (scikit-image's definition, computed with torch on the
images' device), mask IoU and the comparison strip.

Images are float ``(H, W, 3)`` in [0, 1] (numpy arrays or tensors); RGBA ground truth is composited over
a background first (:func:`composite_rgba`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "mask_iou", "composite_rgba", "compare_image", "ERROR_GAIN"]

#: the error panel shows ``ERROR_GAIN * |gt - render|`` (mean over channels), so 1/ERROR_GAIN error is full scale
ERROR_GAIN = 4.0


def _np(image: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    return np.asarray(image, dtype=np.float64)


def psnr(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (peak 1); identical images give 100 dB."""
    mse = float(np.mean((_np(pred) - _np(gt)) ** 2))
    return 100.0 if mse <= 1e-10 else -10.0 * math.log10(mse)


def ssim(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
    """Structural similarity of ``(H, W, 3)`` images in [0, 1]: the value of skimage's
    ``structural_similarity(gt, pred, channel_axis=-1, data_range=1)`` (7x7 uniform window, sample
    covariance, K1 = 0.01, K2 = 0.03, the window-half border left out, mean over pixels and channels).

    Computed in float64 with torch on the device of ``pred`` (a GPU's render needs no copy to the CPU and
    no CPU time: skimage took 0.35 s per 800x800 view); ``tests/test_nerf.py`` checks it against skimage."""
    dev = pred.device if isinstance(pred, torch.Tensor) else torch.device("cpu")
    p = torch.as_tensor(pred).to(dev, torch.float64)
    g = torch.as_tensor(gt).to(dev, torch.float64)
    win = min(7, p.shape[0], p.shape[1])
    win -= 1 - win % 2  # odd window, for images smaller than 7 px
    c1, c2 = 0.01**2, 0.03**2
    x, y = p.permute(2, 0, 1)[None], g.permute(2, 0, 1)[None]  # (1, C, H, W)
    # a window mean without padding covers exactly the pixels skimage keeps after cropping (win - 1) / 2
    mean = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731
    ux, uy = mean(x), mean(y)
    cov = win * win / (win * win - 1.0)  # sample covariance, as skimage's use_sample_covariance=True
    vx = cov * (mean(x * x) - ux * ux)
    vy = cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean(dim=(0, 2, 3)).mean())


def mask_iou(opacity: np.ndarray | torch.Tensor, alpha: np.ndarray | torch.Tensor, threshold: float = 0.5) -> float:
    """Intersection over union of the masks ``opacity > threshold`` and ``alpha > threshold`` ``(H, W)``
    (1.0 when both are empty)."""
    a, b = _np(opacity) > threshold, _np(alpha) > threshold
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def composite_rgba(rgba: torch.Tensor, background: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Straight-alpha RGBA ``(..., 4)`` over a background colour ``(3,)`` -> RGB ``(..., 3)``."""
    bg = torch.as_tensor(background, dtype=rgba.dtype, device=rgba.device)
    a = rgba[..., 3:4]
    return rgba[..., :3] * a + bg * (1.0 - a)


def _heat(err: np.ndarray) -> np.ndarray:
    """Error in [0, 1] ``(H, W)`` -> black-red-yellow-white colours ``(H, W, 3)``."""
    e = np.clip(err, 0.0, 1.0)[..., None]
    return np.clip(np.concatenate([3 * e, 3 * e - 1, 3 * e - 2], axis=-1), 0.0, 1.0)


def compare_image(gt: np.ndarray | torch.Tensor, render: np.ndarray | torch.Tensor) -> np.ndarray:
    """The validation strip ``ground truth | render | error`` as uint8 ``(H, 3 W, 3)``.

    The error panel is ``ERROR_GAIN * mean_c |gt - render|`` in a black-red-yellow-white map (fixed gain so
    strips of different views and runs are comparable).
    """
    g, r = np.clip(_np(gt), 0, 1), np.clip(_np(render), 0, 1)
    err = _heat(ERROR_GAIN * np.abs(g - r).mean(-1))
    strip = np.concatenate([g, r, err], axis=1)
    return (strip * 255.0 + 0.5).astype(np.uint8)
