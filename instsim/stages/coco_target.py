"""The ``import_coco_target`` stage: the user's own labelled images (a COCO detection set) as the target domain.

``target.source: coco`` replaces the rendered target: each split (``val``, ``test``) is a COCO detection
dataset (annotations json + image folder) that is checked, matched to the configured classes by category
*name*, and written in the contract ``render_target`` writes, so every later stage reads it the same way:

* ``target/{split}/images/NNNNN.png``: RGB, ``target.image_size`` square. An image of another size or shape is
  letterboxed (scaled to fit, centred, padded with :data:`LETTERBOX_FILL`) or stretched (``target.resize``),
  and its boxes go through the same scale and offset; alpha is composited over the same fill.
* ``target/{split}/annotations.json``: COCO with images ``1..N`` (in the order of the source's image ids),
  categories ``coco_categories(classes)`` (ids 1..C in sorted name order), and per image the ``source`` entry
  (id, file name, size) and the ``transform`` that maps a source box to the written one.
* ``target/{split}/distribution.json`` only when the config gives the target's pose distribution
  (``target.distribution_file``, the form ``render_target`` writes): then the ``oracle`` strategy exists.

What real exports contain is accepted: non-contiguous category ids in any order, images without annotations,
float boxes, ``info``/``licenses`` and other extra keys, file names in subfolders, any image mode. Bad input is
an :class:`~instsim.errors.InputError` naming the file, the entry (``images[3]``, ``annotations[7]``), its COCO
id and the field; nothing is written until every image has been read and every box checked.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..poses import PoseSpace
from ..detect.coco import BOX_BORDER_TOLERANCE, validate_coco
from ..errors import ConfigError, InputError
from ..io import atomic_dir, read_image_rgba, read_json, write_json, write_png
from .target import coco_categories

__all__ = [
    "TARGET_SOURCES",
    "DEFAULT_TARGET_SOURCE",
    "RESIZE_MODES",
    "DEFAULT_RESIZE",
    "LETTERBOX_FILL",
    "CocoSource",
    "target_source",
    "coco_source",
    "match_categories",
    "fit_transform",
    "read_target_distribution",
    "import_coco_target",
]

log = logging.getLogger(__name__)

#: where the target domain comes from (config ``target.source``); the first is the default
TARGET_SOURCES = ("rendered", "coco")
DEFAULT_TARGET_SOURCE = TARGET_SOURCES[0]
#: how an image of another size becomes ``image_size`` square (config ``target.resize``); the first is the default
RESIZE_MODES = ("letterbox", "stretch")
DEFAULT_RESIZE = RESIZE_MODES[0]
#: grey of letterbox bars and of transparent pixels: the middle of [0, 1], far from neither black nor white objects
LETTERBOX_FILL = 0.5
#: annotation file looked for first in a split folder (then the folder's only ``.json``)
ANNOTATIONS_NAME = "annotations.json"


def target_source(config: Mapping[str, Any]) -> str:
    """The config's ``target.source`` (default :data:`DEFAULT_TARGET_SOURCE`)."""
    return str(config["target"].get("source", DEFAULT_TARGET_SOURCE))


@dataclass(frozen=True)
class CocoSource:
    """One split of a user's COCO set: the annotations json and the folder its ``file_name``s are relative to."""

    annotations: Path
    images: Path


def coco_source(spec: str | Mapping[str, str], field: str, source: str | Path | None = "config") -> CocoSource:
    """Resolve a split of the config (``target.val`` / ``target.test``).

    ``spec`` is a folder (its ``annotations.json``, else its only ``.json`` file; images under its ``images/``
    when that exists, else beside the json) or ``{annotations: <file>, images: <folder>}`` (``images``
    defaults the same way, from the json's folder). A missing file or folder is a :class:`ConfigError` naming
    ``source`` and ``field``.
    """
    if isinstance(spec, str):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise ConfigError(source, field, f"COCO folder '{folder}' does not exist")
        ann = folder / ANNOTATIONS_NAME
        if not ann.is_file():
            found = sorted(folder.glob("*.json"))
            if len(found) != 1:
                raise ConfigError(source, field, f"'{folder}' has no {ANNOTATIONS_NAME} and "
                                  f"{'no' if not found else len(found)} other .json files; name the file with "
                                  "{annotations: <file>, images: <folder>}")
            ann = found[0]
        images = None
    else:
        ann = Path(spec["annotations"]).expanduser()
        if not ann.is_file():
            raise ConfigError(source, f"{field}.annotations", f"COCO annotations file '{ann}' does not exist")
        images = Path(spec["images"]).expanduser() if spec.get("images") else None
        if images is not None and not images.is_dir():
            raise ConfigError(source, f"{field}.images", f"image folder '{images}' does not exist")
    if images is None:
        images = ann.parent / "images" if (ann.parent / "images").is_dir() else ann.parent
    return CocoSource(ann, images)


def match_categories(
    categories: Sequence[Mapping[str, Any]], class_names: Sequence[str], source: str | Path | None, field: str = "categories"
) -> dict[int, int]:
    """Map the COCO category ids of a set to instsim's (``coco_categories(class_names)``) by *name*.

    The names must be the configured classes exactly: a category no class matches, or a class no category
    names, is a :class:`ConfigError` listing both (a detector cannot learn a class it never sees, and a
    target object of an unknown class would count as missed by every strategy alike).
    """
    names = [str(c.get("name", c["id"])) for c in categories]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(source, field, f"category names {dup} occur more than once")
    unmatched = sorted(set(names) - set(class_names))
    missing = sorted(set(class_names) - set(names))
    if unmatched or missing:
        raise ConfigError(
            source, field,
            f"the COCO categories {sorted(names)} do not match the configured classes {sorted(class_names)}"
            f" (categories without a class: {unmatched or 'none'}; classes without a category: {missing or 'none'});"
            " categories are matched to classes by name",
        )
    ours = {c["name"]: c["id"] for c in coco_categories(list(class_names))}
    return {int(c["id"]): ours[name] for c, name in zip(categories, names)}


def fit_transform(width: int, height: int, size: int, resize: str) -> tuple[float, float, int, int, int, int]:
    """How a ``width x height`` image becomes ``size x size``: ``(scale_x, scale_y, offset_x, offset_y, new_w,
    new_h)``, so that a source pixel coordinate ``(x, y)`` lands at ``(x * scale_x + offset_x, y * scale_y +
    offset_y)`` (a box's width and height scale by ``scale_x``, ``scale_y``).

    ``letterbox`` keeps the aspect ratio (the longer side becomes ``size``, the image is centred, whole-pixel
    offsets); ``stretch`` scales each axis to ``size``. The scales are those of the resized pixel grid
    (``new_w / width``), so boxes follow the pixels exactly.
    """
    if resize == "stretch":
        return size / width, size / height, 0, 0, size, size
    if resize != "letterbox":
        raise ValueError(f"unknown resize mode {resize!r} (choose one of {', '.join(RESIZE_MODES)})")
    s = size / max(width, height)
    nw, nh = max(1, min(size, round(width * s))), max(1, min(size, round(height * s)))
    return nw / width, nh / height, (size - nw) // 2, (size - nh) // 2, nw, nh


def _fit_image(rgba: np.ndarray, size: int, resize: str) -> tuple[np.ndarray, tuple[float, float, int, int]]:
    """``(H, W, 4)`` float RGBA -> ``(size, size, 3)`` float RGB on :data:`LETTERBOX_FILL`, and the transform."""
    h, w = rgba.shape[:2]
    sx, sy, ox, oy, nw, nh = fit_transform(w, h, size, resize)
    rgb = rgba[..., :3] * rgba[..., 3:] + LETTERBOX_FILL * (1.0 - rgba[..., 3:])
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    if (nh, nw) != (h, w):
        # antialias: a photo scaled down several times must not alias into stripes the detector never saw
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    out = np.full((size, size, 3), LETTERBOX_FILL, dtype=np.float32)
    out[oy : oy + nh, ox : ox + nw] = x[0].permute(1, 2, 0).clamp(0, 1).numpy()
    return out, (sx, sy, ox, oy)


def read_target_distribution(
    path: str | Path, space: PoseSpace, class_names: Sequence[str], source: str | Path | None = None,
    field: str = "target.distribution_file",
) -> dict[str, torch.Tensor]:
    """The target pose distribution of a ``distribution.json`` in ``render_target``'s form (``pose_space``,
    ``probabilities``), checked against the config's pose space: bins that mean something else would give an
    oracle of another distribution. Returns ``{factor: (bins,)}`` float64.

    A missing file is a :class:`ConfigError` naming ``source`` and ``field``; a bad one an :class:`InputError`
    naming the file and its field.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(source, field, f"distribution file '{path}' does not exist")
    data = read_json(path, "target distribution")
    if not isinstance(data, dict) or "probabilities" not in data:
        raise InputError(path, "probabilities", "missing (the target pose distribution, as render_target writes it)")
    if "pose_space" not in data:
        raise InputError(path, "pose_space", "missing: the bins the probabilities are over must be stated")
    theirs = PoseSpace.from_config(data["pose_space"], source=str(path))
    for f in space.FACTORS:
        a, b = theirs.factor(f), space.factor(f)
        if (a.bins, a.low, a.high) != (b.bins, b.low, b.high):
            raise InputError(path, f"pose_space.{f}", f"{a.bins} bins over [{a.low:g}, {a.high:g}) but the config's "
                             f"pose_space.{f} has {b.bins} bins over [{b.low:g}, {b.high:g})")
    if "classes" in data and sorted(data["classes"]) != sorted(class_names):
        raise InputError(path, "classes", f"{sorted(data['classes'])} are not the configured classes {sorted(class_names)}")
    return space.check_probs(data["probabilities"], source=str(path), field="probabilities")


def _image_index(coco: Mapping) -> dict[int, list[dict]]:
    """Annotations per image id (pycocotools' index, so the COCO semantics are those of the evaluation)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints "creating index..."
        c = COCO()
        c.dataset = dict(coco)
        c.createIndex()
    return {iid: list(c.imgToAnns.get(iid, [])) for iid in c.getImgIds()}


def import_coco_target(
    source: CocoSource,
    class_names: Sequence[str],
    image_size: int,
    resize: str,
    images_dir: str | Path,
    annotations_path: str | Path,
    split: str = "",
) -> dict[str, int]:
    """Check a COCO split and write it as instsim's target split (see the module docstring).

    Returns the number of annotated objects per class. Raises :class:`InputError` (file, entry, id, field) for
    a malformed json, duplicate ids, an unknown ``category_id``, a box of non-positive size or outside its
    image, no images, no annotation in the split, an image file that is missing or cannot be decoded, or a
    ``width``/``height`` in the json that is not the file's; :class:`ConfigError` for categories that are
    not the classes. Nothing is written before all of it has been checked.
    """
    ann_path = source.annotations
    raw = read_json(ann_path, "COCO annotations file")
    coco = validate_coco(raw, ann_path, file_names=True)
    cat_map = match_categories(coco["categories"], class_names, ann_path)
    order = sorted(range(len(coco["images"])), key=lambda i: coco["images"][i]["id"])

    # read every image first: its true size checks the json's and bounds the boxes
    pictures: dict[int, np.ndarray] = {}
    for i in order:
        img = coco["images"][i]
        path = source.images / img["file_name"]
        try:
            pictures[i] = read_image_rgba(path, field=f"images[{i}].file_name")
        except InputError as e:  # name the json and the image id: they are what the user has to look up
            raise InputError(ann_path, f"images[{i}].file_name", f"image id {img['id']}: {path}: {e.message}") from None
        h, w = pictures[i].shape[:2]
        for key, actual in (("width", w), ("height", h)):
            if key in img and not math.isclose(float(img[key]), actual):
                raise InputError(ann_path, f"images[{i}].{key}",
                                 f"image id {img['id']}: {img[key]!r} but {path} is {w}x{h} pixels")
        coco["images"][i] = {**img, "width": w, "height": h}
    coco = validate_coco(coco, ann_path, boxes_in_image=True, file_names=True)
    by_image = _image_index(coco)

    names = {c["id"]: c["name"] for c in coco_categories(list(class_names))}
    counts = {n: 0 for n in sorted(class_names)}
    images, annotations = [], []
    with atomic_dir(images_dir) as tmp:
        for k, i in enumerate(order):
            img = coco["images"][i]
            rgb, (sx, sy, ox, oy) = _fit_image(pictures.pop(i), image_size, resize)
            file_name = f"{k:05d}.png"
            write_png(tmp / file_name, rgb)
            images.append({
                "id": k + 1, "file_name": file_name, "width": image_size, "height": image_size,
                "source": {"id": img["id"], "file_name": img["file_name"], "width": img["width"], "height": img["height"]},
                "transform": {"scale": [sx, sy], "offset": [ox, oy]},
            })
            for ann in sorted(by_image[img["id"]], key=lambda a: a["id"]):
                x, y, bw, bh = ann["bbox"]
                box = [x * sx + ox, y * sy + oy, bw * sx, bh * sy]
                # a box the source let reach BOX_BORDER_TOLERANCE past the border is clipped, so the written
                # set passes the strict checks it is read with
                x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
                x1, y1 = min(box[0] + box[2], float(image_size)), min(box[1] + box[3], float(image_size))
                cid = cat_map[ann["category_id"]]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": k + 1, "category_id": cid,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(ann["area"]) * sx * sy,
                    "iscrowd": ann["iscrowd"], "source_id": ann["id"],
                })
                counts[names[cid]] += 1
    write_json(annotations_path, {
        "info": {"description": f"instsim target domain, split {split}, imported from a COCO set"},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(list(class_names)),
        "import": {
            "annotations": str(ann_path), "images": str(source.images), "resize": resize, "image_size": image_size,
            "fill": LETTERBOX_FILL, "border_tolerance_px": BOX_BORDER_TOLERANCE,
            "box_transform": "x' = x * scale[0] + offset[0], y' = y * scale[1] + offset[1], "
                             "w' = w * scale[0], h' = h * scale[1] (per image: transform)",
            "category_ids": {c["name"]: {"source": next(s for s, t in cat_map.items() if t == c["id"]), "target": c["id"]}
                             for c in coco_categories(list(class_names))},
        },
    })
    log.info("target/%s: imported %d images, %d objects %s from %s", split, len(images), len(annotations), counts, ann_path)
    return counts
