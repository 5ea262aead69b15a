"""The NeRF ``validate`` stage: render held-out views and score them; the camera-convention check.

* :func:`validate_checkpoint`: PSNR and SSIM per test view (composited over a fixed background), the
  opacity-vs-alpha mask IoU, optional ``ground truth | render | error`` strips.
* :func:`convention_check`: the NeRF's opacity mask against a ground-truth renderer's alpha at unseen poses;
  IoU >= 0.9 everywhere means the NeRF lives in the same world frame and camera convention as the data.
* :func:`unseen_poses`: deterministic look-at poses on the training cameras' sphere for that check.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import backend
from ..cameras import Intrinsics, pose_from_spherical
from ..io import write_png
from ..transforms import Views
from .checkpoint import load_checkpoint
from .metrics import compare_image, composite_rgba, mask_iou, psnr, ssim
from .network import InstantNerf
from .rendering import background_color, render

__all__ = ["validate_checkpoint", "convention_check", "unseen_poses", "BACKGROUNDS"]

BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


def _model(ckpt: str | Path | InstantNerf, device: str | torch.device, expect: Mapping[str, Any] | None) -> InstantNerf:
    if isinstance(ckpt, InstantNerf):
        return ckpt
    model, _ = load_checkpoint(ckpt, expect=expect, device=device)
    return model


@torch.no_grad()
def validate_checkpoint(
    ckpt: str | Path | InstantNerf,
    test_views: Views,
    background: str | Sequence[float] = "white",
    min_psnr: float | None = None,
    *,
    comparison_dir: str | Path | None = None,
    comparisons: list | None = None,
    expect: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    chunk: int | None = None,
) -> dict[str, Any]:
    """Render every test view and compare it with the ground truth.

    Args:
        ckpt: checkpoint path (loaded with ``expect``) or a model.
        test_views: held-out views (RGBA straight alpha, world poses).
        background: ``"white"``, ``"black"`` or an RGB triple; both the render and the ground truth are
            composited over it.
        min_psnr: ``passed`` is ``psnr >= min_psnr`` (mean over views); None: always passed.
        comparison_dir: if given, ``<file stem>.png`` strips (gt | render | error) are written there.
        comparisons: if given, each view's strip (uint8 ``(H, 3 W, 3)``) is appended to it, in view order
            (for a caller that writes them as one image: no PNG per view).
        device: where the model runs.
        chunk: rays per render pass (None: :func:`~instsim.nerf.rendering.render`'s default for the backend).

    Returns:
        ``psnr`` and ``ssim`` (means over views, dB and [-1, 1]), ``mask_iou`` (mean, opacity vs alpha at 0.5),
        ``per_view`` (list of ``{file_path, psnr, ssim, mask_iou}``), ``n_views``, ``background`` (RGB list),
        ``min_psnr``, ``passed``; and ``backend_fallback`` (the kernels' load error) when ``backend: auto`` ran
        the PyTorch path on a GPU.
    """
    model = _model(ckpt, device, expect)
    model.eval()
    dev = next(model.parameters()).device
    bg = background_color(background, torch.zeros(3))
    per_view = []
    for i, (image, pose) in enumerate(zip(test_views.images, test_views.poses)):
        out = render(model, pose.to(dev), test_views.intrinsics, background=bg.to(dev), chunk=chunk)
        pred_dev = out["rgb"].clamp(0, 1)
        pred = pred_dev.cpu()
        gt = composite_rgba(image, bg)
        name = test_views.file_paths[i] if i < len(test_views.file_paths) else f"view_{i:04d}"
        per_view.append(
            {
                "file_path": name,
                "psnr": psnr(pred, gt),
                "ssim": ssim(pred_dev, gt),  # on the model's device
                "mask_iou": mask_iou(out["opacity"].cpu(), image[..., 3]),
            }
        )
        if comparison_dir is not None or comparisons is not None:
            strip = compare_image(gt, pred)
            if comparisons is not None:
                comparisons.append(strip)
            if comparison_dir is not None:
                write_png(Path(comparison_dir) / f"{Path(name).stem}.png", strip)
    n = len(per_view)
    mean = lambda k: float(sum(v[k] for v in per_view) / n) if n else float("nan")  # noqa: E731
    result = {
        "psnr": mean("psnr"),
        "ssim": mean("ssim"),
        "mask_iou": mean("mask_iou"),
        "per_view": per_view,
        "n_views": n,
        "background": [float(c) for c in bg],
        "min_psnr": min_psnr,
    }
    result["passed"] = bool(n > 0 and (min_psnr is None or result["psnr"] >= min_psnr))
    reason = backend.fallback_reason(dev) if model.cfg.backend == "auto" else None
    if reason is not None:  # the numbers above are the PyTorch path's, on a GPU that was meant to run the kernels
        result["backend_fallback"] = reason
    return result


def unseen_poses(intrinsics_info: Mapping[str, Any], n: int = 5, seed: int = 0) -> torch.Tensor:
    """``n`` look-at poses ``(n, 4, 4)`` (float32, world units) around the scene centre at the mean training
    camera distance: azimuths spread evenly with a seeded random phase, elevations between -30 and 60 deg.
    Random views of a sphere are (almost surely) none of the training views."""
    gen = torch.Generator().manual_seed(seed)
    phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
    az = torch.tensor([phase + 2 * math.pi * k / n for k in range(n)], dtype=torch.float64)
    el = torch.deg2rad(-30.0 + 90.0 * torch.rand(n, generator=gen, dtype=torch.float64))
    r = torch.full((n,), float(intrinsics_info["radius"]["mean"]), dtype=torch.float64)
    centre = torch.tensor([float(c) for c in intrinsics_info["centre"]], dtype=torch.float64)
    return pose_from_spherical(az, el, r, centre).float()


@torch.no_grad()
def convention_check(
    ckpt: str | Path | InstantNerf,
    poses: torch.Tensor,
    intrinsics: Intrinsics,
    gt_alpha: torch.Tensor,
    min_iou: float = 0.9,
    threshold: float = 0.5,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Compare the NeRF's opacity with a ground-truth renderer's alpha at ``poses`` ``(n, 4, 4)``.

    Args:
        gt_alpha: ``(n, H, W)`` coverage in [0, 1] of the same poses and ``intrinsics`` (e.g.
            :func:`instsim.scene.render_alpha_depth`).
        min_iou: every pose must reach this mask IoU (masks thresholded at ``threshold``).

    Returns ``{"iou": [per pose], "min_iou": worst, "threshold": min_iou, "passed": bool}``. A flipped axis,
    a transposed pose or a wrong normalization gives IoUs far below 0.9.
    """
    model = _model(ckpt, device, None)
    model.eval()
    dev = next(model.parameters()).device
    ious = []
    for pose, alpha in zip(poses, gt_alpha):
        out = render(model, pose.to(dev), intrinsics)
        ious.append(mask_iou(out["opacity"].cpu(), alpha, threshold))
    worst = min(ious) if ious else float("nan")
    return {"iou": ious, "min_iou": worst, "threshold": min_iou, "passed": bool(ious) and worst >= min_iou}
