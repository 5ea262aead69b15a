"""Read, validate and write BlenderNeRF / NeRF-synthetic ``transforms_*.json`` files.

The format (as written by Blender's BlenderNeRF add-on and used by NeRF-synthetic / Instant-NGP):

* intrinsics at the top level: ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h`` and/or ``camera_angle_x``
  (``camera_angle_y``); optional ``aabb_scale``; other keys (``k1``, ...) are kept but unused;
* ``frames``: a list of ``{"file_path": "train/0001.png", "transform_matrix": 4x4 camera-to-world}``.
  ``file_path`` is relative to the json's folder, with or without the image extension.

Every problem raises :class:`~instsim.errors.InputError` naming the json file, the frame index and the field
(``frames[3].transform_matrix``), never a bare ``KeyError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .cameras import Intrinsics, rigidity_error
from .errors import InputError
from .io import read_image, read_json, write_json

__all__ = ["Frame", "Transforms", "Views", "read_transforms", "write_transforms", "load_views", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".exr", ".webp")
#: tolerance on |R^T R - I| and |det R - 1|; BlenderNeRF writes float32 matrices (errors ~1e-7)
RIGIDITY_TOL = 1e-3
#: per-frame keys that describe a camera; frames carrying their own must agree with the file's camera
CAMERA_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x")


@dataclass
class Frame:
    """One view: ``file_path`` as written in the json, ``image_path`` resolved on disk, ``c2w`` ``(4, 4)``."""

    file_path: str
    image_path: Path
    c2w: np.ndarray


@dataclass
class Transforms:
    """A validated transforms file: one shared camera and its frames."""

    path: Path
    intrinsics: Intrinsics
    frames: list[Frame]
    aabb_scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def poses(self) -> torch.Tensor:
        """``(N, 4, 4)`` float32 camera-to-world matrices."""
        return torch.from_numpy(np.stack([f.c2w for f in self.frames])).float()


@dataclass
class Views:
    """Images and cameras of one split, ready for training or evaluation.

    ``images``: ``(N, H, W, 4)`` float32 RGBA in [0, 1], straight alpha (RGB files get alpha 1);
    ``poses``: ``(N, 4, 4)``; ``intrinsics`` shared by all views.
    """

    images: torch.Tensor
    poses: torch.Tensor
    intrinsics: Intrinsics
    file_paths: list[str]


def resolve_image(json_path: Path, file_path: str, field_name: str) -> Path:
    """The image a frame's ``file_path`` refers to. Paths without an extension get the first existing one
    of :data:`IMAGE_EXTENSIONS`; a missing file raises :class:`InputError`."""
    base = (json_path.parent / file_path).resolve()
    if base.suffix.lower() in IMAGE_EXTENSIONS:
        candidates = [base]
    else:
        candidates = [base.with_name(base.name + ext) for ext in IMAGE_EXTENSIONS] + [base]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise InputError(json_path, field_name, f"image '{file_path}' not found (looked for {candidates[0]})")


def _parse_matrix(json_path: Path, value: Any, field_name: str) -> np.ndarray:
    try:
        mat = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(json_path, field_name, "must be a 4x4 array of numbers") from None
    if mat.shape != (4, 4):
        raise InputError(json_path, field_name, f"must be a 4x4 matrix, got shape {mat.shape}")
    if not np.isfinite(mat).all():
        raise InputError(json_path, field_name, "contains NaN or infinite values")
    err = float(rigidity_error(torch.from_numpy(mat)))
    if err > RIGIDITY_TOL:
        raise InputError(
            json_path, field_name, f"is not a rigid camera-to-world transform (rotation/bottom-row error {err:.3g})"
        )
    return mat


def _check_frame_camera(json_path: Path, frame: Mapping, index: int, intr: Intrinsics, meta: Mapping) -> None:
    """Instant-NGP allows per-frame cameras; instsim needs one camera per split, so they must agree."""
    own = {k: frame[k] for k in CAMERA_KEYS if k in frame}
    if not own:
        return
    merged = {**{k: meta[k] for k in CAMERA_KEYS if k in meta}, **own}
    frame_intr = Intrinsics.from_transforms(merged, file=f"{json_path} frames[{index}]")
    for key in ("w", "h", "fl_x", "fl_y", "cx", "cy"):
        a, b = getattr(frame_intr, key), getattr(intr, key)
        if not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4):
            raise InputError(
                json_path,
                f"frames[{index}].{key}",
                f"frames use different cameras ({key} = {a} here, {b} for the file); "
                "instsim needs one camera per transforms file",
            )


def _read_frame_image(json_path: Path, image_path: Path, index: int) -> np.ndarray:
    """Frame ``index``'s image; an unreadable one raises :class:`InputError` naming the json, the frame's field
    and the image (the user edits the json or replaces the image, so both must be named)."""
    field_name = f"frames[{index}].file_path"
    try:
        return read_image(image_path, field=field_name)
    except InputError as e:
        raise InputError(json_path, field_name, f"image {image_path}: {e.message}") from None


def read_transforms(path: str | Path, check_images: bool = True) -> Transforms:
    """Read and validate a transforms json.

    Args:
        path: the ``transforms_*.json`` file.
        check_images: also decode every image and check it matches ``w``/``h`` (catches missing,
            truncated and wrongly sized images before any training starts).
    """
    path = Path(path)
    meta = read_json(path, "transforms file")
    if not isinstance(meta, dict):
        raise InputError(path, None, f"top level must be a JSON object, got {type(meta).__name__}")
    intr = Intrinsics.from_transforms(meta, file=str(path))
    frames_raw = meta.get("frames")
    if frames_raw is None:
        raise InputError(path, "frames", "missing (list of {file_path, transform_matrix})")
    if not isinstance(frames_raw, list):
        raise InputError(path, "frames", f"must be a list, got {type(frames_raw).__name__}")
    if not frames_raw:
        raise InputError(path, "frames", "is empty: the dataset has no views")
    frames = []
    for i, fr in enumerate(frames_raw):
        if not isinstance(fr, dict):
            raise InputError(path, f"frames[{i}]", "must be an object with file_path and transform_matrix")
        for key in ("file_path", "transform_matrix"):
            if key not in fr:
                raise InputError(path, f"frames[{i}].{key}", "missing")
        if not isinstance(fr["file_path"], str) or not fr["file_path"]:
            raise InputError(path, f"frames[{i}].file_path", "must be a non-empty string")
        c2w = _parse_matrix(path, fr["transform_matrix"], f"frames[{i}].transform_matrix")
        _check_frame_camera(path, fr, i, intr, meta)
        image_path = resolve_image(path, fr["file_path"], f"frames[{i}].file_path")
        if check_images:
            img = _read_frame_image(path, image_path, i)
            if img.shape[:2] != (intr.h, intr.w):
                raise InputError(
                    path,
                    f"frames[{i}].file_path",
                    f"image {image_path.name} is {img.shape[1]}x{img.shape[0]} but w x h is {intr.w}x{intr.h}",
                )
        frames.append(Frame(fr["file_path"], image_path, c2w))
    aabb = meta.get("aabb_scale")
    if aabb is not None and (isinstance(aabb, bool) or not isinstance(aabb, (int, float)) or not aabb > 0):
        raise InputError(path, "aabb_scale", f"must be a positive number, got {aabb!r}")
    known = set(CAMERA_KEYS) | {"camera_angle_y", "frames", "aabb_scale"}
    extra = {k: v for k, v in meta.items() if k not in known}
    return Transforms(path, intr, frames, float(aabb) if aabb is not None else None, extra)


def write_transforms(
    path: str | Path,
    intrinsics: Intrinsics,
    frames: Sequence[tuple[str, np.ndarray | torch.Tensor]],
    aabb_scale: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a transforms json (atomically) in the BlenderNeRF layout: intrinsics, ``camera_angle_x``,
    optional ``aabb_scale`` and ``frames`` of ``(file_path, c2w (4, 4))``."""
    meta: dict[str, Any] = {
        "camera_angle_x": intrinsics.fov_x,
        "fl_x": intrinsics.fl_x,
        "fl_y": intrinsics.fl_y,
        "cx": intrinsics.cx,
        "cy": intrinsics.cy,
        "w": intrinsics.w,
        "h": intrinsics.h,
    }
    if aabb_scale is not None:
        meta["aabb_scale"] = aabb_scale
    meta.update(extra or {})
    meta["frames"] = [
        {"file_path": fp, "transform_matrix": np.asarray(m, dtype=np.float64).tolist()} for fp, m in frames
    ]
    write_json(path, meta)


def load_views(path: str | Path, transforms: Transforms | None = None) -> Views:
    """Load every image of a transforms file with its pose (images as RGBA float32, see :class:`Views`)."""
    tf = transforms or read_transforms(path, check_images=False)
    imgs = []
    for i, fr in enumerate(tf.frames):
        img = _read_frame_image(tf.path, fr.image_path, i)
        if img.shape[:2] != (tf.intrinsics.h, tf.intrinsics.w):
            raise InputError(tf.path, f"frames[{i}].file_path", f"image size {img.shape[1]}x{img.shape[0]} != w x h")
        if img.shape[-1] == 3:
            img = np.concatenate([img, np.ones_like(img[..., :1])], axis=-1)
        imgs.append(img)
    images = torch.from_numpy(np.stack(imgs))
    return Views(images, tf.poses(), tf.intrinsics, [f.file_path for f in tf.frames])
