"""The ``generate_dataset`` stage: NeRF training views of one class in BlenderNeRF format.

* ``procedural`` classes: cameras on a sphere (or upper hemisphere) around the built-in hand, like
  BlenderNeRF's "camera on sphere", rendered by instsim's own renderer.
* ``folder`` classes: an existing BlenderNeRF / NeRF-synthetic dataset is validated and brought into the
  results folder by symbolic links (no copy of the images), with a val split taken from train when absent.

Output layout under ``out_dir``: ``transforms_{train,val,test}.json`` and ``{train,val,test}/NNNN.png``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from ..cameras import Intrinsics, sample_sphere_poses
from ..errors import InputError
from ..io import atomic_dir, write_png
from ..scene import make_hand, render_scene
from ..seeds import class_seed
from ..transforms import Frame, read_transforms, write_transforms

__all__ = ["SPLITS", "CLASS_SOURCES", "generate_procedural", "import_folder"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: where a class's object comes from (the config's ``classes.<name>.source``): ``procedural`` the built-in hand
#: (:func:`generate_procedural`), ``folder`` a BlenderNeRF / NeRF-synthetic dataset (:func:`import_folder`),
#: ``blender`` an object of a .blend file (:func:`instsim.scene.blender.capture_blender_class`, then :func:`import_folder`)
CLASS_SOURCES = ("procedural", "folder", "blender")


def dataset_intrinsics(ds_cfg: Mapping[str, Any]) -> Intrinsics:
    """The square camera of procedural datasets, from ``image_size`` and ``fov_deg``."""
    size = int(ds_cfg["image_size"])
    return Intrinsics.from_fov(size, size, math.radians(float(ds_cfg["fov_deg"])))


def generate_procedural(
    gesture: str,
    out_dir: str | Path,
    ds_cfg: Mapping[str, Any],
    seed: int,
    batch: int = 8,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, int]:
    """Render train/val/test views of a procedural hand and write them in BlenderNeRF format.

    Args:
        gesture: ``fist``, ``yeah`` or ``palm``.
        out_dir: the class's data folder.
        ds_cfg: the config's ``dataset`` section.
        seed: the run's seed; each split gets its own camera set derived from it and the gesture.
        device: where the scene is ray-traced (the cameras are drawn on the CPU either way; a GPU's images
            can differ from the CPU's in the last bit, so byte-identical datasets need the same device).

    Returns the number of views per split.
    """
    scene = make_hand(gesture).to(device)
    intr = dataset_intrinsics(ds_cfg)
    out_dir = Path(out_dir)
    counts = {}
    for split in SPLITS:
        n = int(ds_cfg["views"][split])
        gen = torch.Generator().manual_seed(class_seed(seed, gesture, split))
        poses = sample_sphere_poses(n, float(ds_cfg["radius"]), gen, upper_hemisphere=bool(ds_cfg["upper_hemisphere"]))
        frames = []
        with atomic_dir(out_dir / split) as tmp:
            bar = tqdm(total=n, desc=f"{gesture}/{split}", unit="view", disable=not progress, mininterval=2.0)
            for start in range(0, n, batch):
                rgba = render_scene(scene, poses[start : start + batch], intr, supersample=int(ds_cfg["supersample"]))
                for k, image in enumerate(rgba):
                    name = f"{start + k + 1:04d}.png"
                    write_png(tmp / name, image.cpu().numpy())
                    frames.append((f"{split}/{name}", poses[start + k]))
                bar.update(len(rgba))
            bar.close()
        write_transforms(out_dir / f"transforms_{split}.json", intr, frames)
        counts[split] = n
        log.info("%s: wrote %d %s views (%dx%d)", gesture, n, split, intr.w, intr.h)
    return counts


def _link(src: Path, dst: Path) -> bool:
    """Symbolic link ``dst`` -> ``src`` (absolute), or a copy where links are not possible; True if copied."""
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)
        return True
    return False


def _write_split(out_dir: Path, split: str, tf_intr: Intrinsics, frames: list[Frame], meta_extra: dict) -> None:
    entries, copied = [], 0
    with atomic_dir(out_dir / split) as tmp:
        for i, fr in enumerate(frames):
            name = f"{i + 1:04d}{fr.image_path.suffix.lower()}"
            copied += _link(fr.image_path, tmp / name)
            entries.append((f"{split}/{name}", fr.c2w))
    if copied:  # same pixels either way; said because a copy costs the disk space a link does not
        log.info("%s: the file system refused symbolic links, copied %d of %d %s images", out_dir, copied, len(frames), split)
    write_transforms(out_dir / f"transforms_{split}.json", tf_intr, entries, extra=meta_extra)


def import_folder(src: str | Path, out_dir: str | Path, val_fraction: float) -> dict[str, int]:
    """Validate a BlenderNeRF / NeRF-synthetic dataset folder and link it into ``out_dir``.

    Every split's json and images are checked (see :func:`~instsim.transforms.read_transforms`). Without
    ``transforms_val.json`` every k-th train view (k from ``val_fraction``) becomes val; without
    ``transforms_test.json`` the same is done for test. All splits must share one camera.
    """
    src, out_dir = Path(src).expanduser(), Path(out_dir)
    if not src.is_dir():
        raise InputError(src, "path", "dataset folder does not exist")
    train_json = src / "transforms_train.json"
    if not train_json.is_file():
        raise InputError(src, "transforms_train.json", "missing: not a BlenderNeRF / NeRF-synthetic dataset folder")
    train = read_transforms(train_json)
    splits = {"train": train}
    for split in ("val", "test"):
        path = src / f"transforms_{split}.json"
        if path.is_file():
            splits[split] = read_transforms(path)
            other = splits[split].intrinsics
            if other != train.intrinsics:
                raise InputError(path, "fl_x", f"camera differs from transforms_train.json ({other} vs {train.intrinsics})")
    frames = {name: list(tf.frames) for name, tf in splits.items()}
    for split in ("val", "test"):
        if split not in frames:
            step = max(2, round(1.0 / val_fraction))
            taken = frames["train"][::step]
            if len(frames["train"]) - len(taken) < 1:
                raise InputError(train_json, "frames", "too few views to split off a val/test set")
            frames[split] = taken
            frames["train"] = [f for i, f in enumerate(frames["train"]) if i % step != 0]
            log.info("%s: no transforms_%s.json, took %d train views for it", src, split, len(taken))
    extra = {"aabb_scale": train.aabb_scale} if train.aabb_scale is not None else {}
    for split in SPLITS:
        _write_split(out_dir, split, train.intrinsics, frames[split], extra)
    return {split: len(frames[split]) for split in SPLITS}
