"""``source: blender`` classes: an object (or collection) of a ``.blend`` file captured as a BlenderNeRF dataset.

Cameras on a sphere (or the upper hemisphere) around the object's bounding-box centre, like BlenderNeRF's
Camera-on-Sphere: the poses are drawn here by :func:`instsim.cameras.sample_sphere_poses` (the one camera
convention; per split from the run's seed and the class name), rendered headless by Blender in a process of its
own (:mod:`instsim.scene.blender_render`, run by the Python that has ``bpy``), and written as
``transforms_{train,val,test}.json`` + ``{split}/NNNN.png`` (RGBA), exactly what the add-on writes; the result
then goes through the same checks as a ``folder`` class (:func:`instsim.stages.dataset.import_folder`).

The capture settings (:class:`BlenderCapture`) are the class's config keys; those not given take the
``dataset`` section's (image size, radius, upper hemisphere, views per split, and the lens from its
``fov_deg``), so a Blender class is framed like a procedural one unless told otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from ..cameras import Intrinsics, sample_sphere_poses
from ..errors import ConfigError, InputError
from ..io import atomic_dir
from ..seeds import class_seed
from ..transforms import write_transforms

__all__ = ["BlenderCapture", "ENGINES", "BLENDER_KEYS", "bpy_python", "capture_blender_class"]

log = logging.getLogger(__name__)

#: render engines a class may ask for (config ``engine``); the first is the default
ENGINES = ("cycles", "eevee", "workbench")
SPLITS = ("train", "val", "test")
RENDER_SCRIPT = Path(__file__).with_name("blender_render.py")
#: exit status of the render script for a fault of the input (object not found, ...), told in its result json
INPUT_FAULT = 3


@dataclass(frozen=True)
class BlenderCapture:
    """How a Blender class is captured. ``None`` fields take the config's ``dataset`` section's value.

    blend: the ``.blend`` file; object / collection: what is captured (exactly one).
    lens_mm: focal length (default: from ``dataset.fov_deg`` on ``sensor_mm``); sensor_mm: sensor width.
    radius: camera distance from the centre (world units); upper_hemisphere: cameras at elevation >= 0 only.
    image_size: pixels, square; views: ``{train, val, test}`` counts.
    engine: ``cycles`` (CPU), ``eevee`` or ``workbench``; samples: render samples per pixel.
    aabb_scale: written to the transforms files as BlenderNeRF's ``aabb`` setting does (its default 4).
    python: the interpreter with ``bpy`` (default: this one).
    """

    blend: str
    object: str | None = None
    collection: str | None = None
    lens_mm: float | None = None
    sensor_mm: float = 36.0
    radius: float | None = None
    upper_hemisphere: bool | None = None
    image_size: int | None = None
    views: Mapping[str, int] | None = None
    engine: str = ENGINES[0]
    samples: int = 32
    aabb_scale: int = 4
    python: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str, source: str | Path | None = "config") -> "BlenderCapture":
        """From a class's config entry (its ``source`` key ignored); unknown keys, not exactly one of object and
        collection, or an unknown engine are a :class:`ConfigError` naming ``classes.<name>.<key>``."""
        cfg = {k: v for k, v in cfg.items() if k != "source"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(source, f"classes.{name}.{unknown[0]}", f"not a key of a blender class ({sorted(known)})")
        if "blend" not in cfg:
            raise ConfigError(source, f"classes.{name}.blend", "missing: the .blend file to capture")
        cap = cls(**cfg)
        if (cap.object is None) == (cap.collection is None):
            raise ConfigError(source, f"classes.{name}", "a blender class names exactly one of object or collection")
        if cap.engine not in ENGINES:
            raise ConfigError(source, f"classes.{name}.engine", f"{cap.engine!r} is not one of {list(ENGINES)}")
        return cap

    def resolved(self, ds_cfg: Mapping[str, Any]) -> "BlenderCapture":
        """The settings with the ``dataset`` section's values filled in."""
        lens = self.lens_mm
        if lens is None:  # the dataset's horizontal field of view on this sensor width
            lens = 0.5 * self.sensor_mm / math.tan(0.5 * math.radians(float(ds_cfg["fov_deg"])))
        return BlenderCapture(**{
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "lens_mm": float(lens),
            "radius": float(self.radius if self.radius is not None else ds_cfg["radius"]),
            "upper_hemisphere": bool(self.upper_hemisphere if self.upper_hemisphere is not None else ds_cfg["upper_hemisphere"]),
            "image_size": int(self.image_size if self.image_size is not None else ds_cfg["image_size"]),
            "views": {s: int((self.views or ds_cfg["views"])[s]) for s in SPLITS},
        })

    def intrinsics(self) -> Intrinsics:
        """The pinhole camera Blender renders with: sensor fit AUTO on a square image, so the focal length in
        pixels is ``lens / sensor * size`` on both axes, principal point at the centre."""
        size = int(self.image_size)
        fl = float(self.lens_mm) / float(self.sensor_mm) * size
        return Intrinsics(size, size, fl, fl, size / 2.0, size / 2.0)


#: config keys of a blender class (the schema documents each)
BLENDER_KEYS = tuple(f.name for f in fields(BlenderCapture))


def bpy_python(cap: BlenderCapture, where: str) -> str:
    """The interpreter that renders: the class's ``python``, else this one when it can import ``bpy``."""
    if cap.python:
        if not Path(cap.python).expanduser().exists():
            raise ConfigError("config", f"{where}.python", f"interpreter '{cap.python}' does not exist")
        return str(Path(cap.python).expanduser())
    if importlib.util.find_spec("bpy") is None:
        raise ConfigError("config", f"{where}.source", "a blender class needs bpy: `pip install 'instsim[blender]'` "
                          "(Blender as a Python module, Python 3.11), or name an interpreter that has it as "
                          f"{where}.python")
    return sys.executable


def capture_blender_class(
    cfg: Mapping[str, Any], name: str, ds_cfg: Mapping[str, Any], seed: int, render_dir: str | Path
) -> tuple[Path, dict[str, int]]:
    """Render a blender class into ``render_dir`` (replaced atomically) in BlenderNeRF's folder format.

    Returns the folder and the views per split. A missing ``.blend``, an object or collection that is not in
    it, or an engine Blender lacks raise :class:`InputError` naming the file and ``classes.<name>.<key>``; a
    render that crashes raises :class:`InputError` with the tail of Blender's output.
    """
    where = f"classes.{name}"
    cap = BlenderCapture.from_config(cfg, name).resolved(ds_cfg)
    blend = Path(cap.blend).expanduser().resolve()
    if not blend.is_file():
        raise InputError(blend, f"{where}.blend", "the .blend file does not exist")
    python = bpy_python(cap, where)
    intr = cap.intrinsics()
    poses, jobs = {}, []
    for split in SPLITS:
        gen = torch.Generator().manual_seed(class_seed(seed, name, split))
        poses[split] = sample_sphere_poses(cap.views[split], cap.radius, gen, upper_hemisphere=cap.upper_hemisphere)
        jobs += [{"file_path": f"{split}/{i + 1:04d}.png", "c2w": p.double().tolist()} for i, p in enumerate(poses[split])]
    render_dir = Path(render_dir).resolve()  # Blender runs in a scratch folder: every path it gets is absolute
    with atomic_dir(render_dir) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        job = {"blend": str(blend), "object": cap.object, "collection": cap.collection, "out_dir": str(tmp),
               "width": intr.w, "height": intr.h, "lens_mm": cap.lens_mm, "sensor_mm": cap.sensor_mm,
               "engine": cap.engine, "samples": cap.samples, "seed": seed, "result": str(tmp / "result.json"),
               "frames": jobs}
        (tmp / "job.json").write_text(json.dumps(job))
        with tempfile.TemporaryDirectory() as scratch:  # Blender writes its temp files here, not in the dataset
            proc = subprocess.run([python, str(RENDER_SCRIPT), str(tmp / "job.json")], capture_output=True, text=True,
                                  cwd=scratch)
        result = json.loads((tmp / "result.json").read_text()) if (tmp / "result.json").is_file() else None
        if proc.returncode == INPUT_FAULT and result and "error" in result:
            err = result["error"]
            raise InputError(blend, f"{where}.{err['field']}", err["message"])
        if proc.returncode != 0 or result is None:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise InputError(blend, where, f"Blender render failed (exit {proc.returncode}) in {python}:\n{tail}")
        frames = {s: [] for s in SPLITS}
        for fr in result["frames"]:
            frames[fr["file_path"].split("/")[0]].append((fr["file_path"], fr["c2w"]))
        for split in SPLITS:
            write_transforms(tmp / f"transforms_{split}.json", intr, frames[split], aabb_scale=cap.aabb_scale,
                             extra={"blender": {"file": str(blend), "object": cap.object, "collection": cap.collection,
                                                "centre": result["centre"], "engine": result["engine"],
                                                "samples": cap.samples, "lens_mm": cap.lens_mm,
                                                "sensor_mm": cap.sensor_mm, "version": result["blender"]}})
    log.info("%s: rendered %s of %s in Blender %s (%s, %d samples, %d px)", name, cap.views, blend, result["blender"],
             result["engine"], cap.samples, intr.w)
    return render_dir, dict(cap.views)
