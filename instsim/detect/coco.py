"""COCO-format ground truth and detections, strict validation, and COCO metrics via pycocotools.

Conventions: image ids are ``1..N`` in the order of the arrays given to :func:`make_coco_gt`; category ids
are ``label + 1`` (0-based detector labels, 1-based COCO ids); ``bbox`` is ``[x, y, w, h]`` pixels.

Invalid input fails with :class:`~instsim.errors.InputError` naming the file and the field
(e.g. ``annotations[3].bbox``); an annotation file without any annotation is an error too (AP would
be undefined).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config_fields import is_int, is_number
from ..errors import InputError
from .decode import Detections

__all__ = [
    "make_coco_gt",
    "detections_to_coco",
    "validate_coco",
    "load_coco",
    "validate_detections",
    "load_detections",
    "evaluate_coco",
]

_GT_SOURCE = "<ground-truth dict>"
_DET_SOURCE = "<detections>"


def make_coco_gt(
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    image_size: int | tuple[int, int],
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    file_names: Sequence[str] | None = None,
) -> dict:
    """A COCO ground-truth dict from per-image ``(n_i, 4)`` xywh pixel boxes and ``(n_i,)`` 0-based labels.

    Args:
        image_size: ``S`` or ``(H, W)`` pixels (written as each image's ``height``/``width``).
        class_names: names of the classes (``len == C``); default ``class0, class1, ...``.
        num_classes: ``C`` when ``class_names`` is not given (default: max label + 1).
        file_names: optional per-image file names.
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} box lists but {len(labels)} label lists")
    if class_names is None:
        if num_classes is None:
            num_classes = 1 + max((int(torch.as_tensor(lb).max()) for lb in labels if len(lb)), default=0)
        class_names = [f"class{c}" for c in range(num_classes)]
    cats = [{"id": c + 1, "name": str(name), "supercategory": "object"} for c, name in enumerate(class_names)]
    images, anns = [], []
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        img = {"id": i + 1, "width": int(W), "height": int(H)}
        img["file_name"] = str(file_names[i]) if file_names is not None else f"{i:06d}.png"
        images.append(img)
        bx = torch.as_tensor(bx, dtype=torch.float64).reshape(-1, 4)
        lb = torch.as_tensor(lb, dtype=torch.long).reshape(-1)
        for b, c in zip(bx.tolist(), lb.tolist()):
            if not 0 <= c < len(cats):
                raise ValueError(f"labels[{i}] has class {c} outside [0, {len(cats)})")
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [float(v) for v in b],
                         "area": float(b[2] * b[3]), "iscrowd": 0})
    return {"info": {"description": "instsim detection ground truth"}, "images": images, "annotations": anns,
            "categories": cats}


def detections_to_coco(detections: Sequence[Detections], image_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO result records ``{image_id, category_id, bbox, score}`` from per-image :class:`Detections`
    (image ids default to ``1..N`` in order, category id = label + 1)."""
    if image_ids is None:
        image_ids = range(1, len(detections) + 1)
    if len(image_ids) != len(detections):
        raise ValueError(f"got {len(detections)} detection lists for {len(image_ids)} image ids")
    out = []
    for iid, det in zip(image_ids, detections):
        for b, s, c in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            out.append({"image_id": int(iid), "category_id": int(c) + 1, "bbox": [float(v) for v in b], "score": float(s)})
    return out


def _list_field(d: Mapping, key: str, source: str, allow_empty: bool, what: str) -> list:
    if key not in d:
        raise InputError(source, key, f"missing (a COCO file needs a list of {what})")
    v = d[key]
    if not isinstance(v, list):
        raise InputError(source, key, f"must be a list of {what}, got {type(v).__name__}")
    if not v and not allow_empty:
        raise InputError(source, key, f"is empty: needs at least one of {what}")
    return v


def _check_bbox(bbox: Any, source: str, field: str, allow_zero: bool = False, what: str = "") -> list[float]:
    pre = f"{what}: " if what else ""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        raise InputError(source, field, f"{pre}must be [x, y, width, height] with 4 finite numbers, got {bbox!r}")
    if (bbox[2] < 0 or bbox[3] < 0) if allow_zero else (bbox[2] <= 0 or bbox[3] <= 0):
        raise InputError(source, field,
                         f"{pre}width and height must be {'>= 0' if allow_zero else '> 0'} pixels, got {bbox!r}")
    return [float(v) for v in bbox]


def _check_record(record: Any, source: str, field: str, kind: str, seen_ids: set) -> None:
    """``record`` (``images[i]``, ``categories[i]`` or ``annotations[i]``, named by ``field``) is an object with an
    integer ``id`` not in ``seen_ids``; ``kind`` names the id in the message."""
    if not isinstance(record, Mapping):
        raise InputError(source, field, f"must be an object, got {type(record).__name__}")
    if "id" not in record or not is_int(record["id"]):
        raise InputError(source, f"{field}.id", f"must be an integer {kind} id, got {record.get('id')!r}")
    if record["id"] in seen_ids:
        raise InputError(source, f"{field}.id", f"duplicate {kind} id {record['id']}")


#: how far (pixels) a box may reach past its image's border: exports write float boxes, and a box clipped to the
#: border can come back a rounding error past it; anything further is a labelling error
BOX_BORDER_TOLERANCE = 1e-3


def validate_coco(
    d: Any, source: str | Path | None = None, *, boxes_in_image: bool = False, file_names: bool = False
) -> dict:
    """Check a COCO ground-truth dict and return a normalised copy (``area`` and ``iscrowd`` filled in).

    Messages name the list index as the field (``annotations[3].bbox``) and the COCO id in the text, since
    a user finds an entry of a real export by its id. Extra keys (``info``, ``licenses``, ``segmentation``,
    ``license``, ...) are kept untouched.

    Args:
        boxes_in_image: also require every image to give ``width``/``height`` and every box to lie inside
            its image (within :data:`BOX_BORDER_TOLERANCE` pixels): a user's import, where a box outside the
            image is a labelling error.
        file_names: also require every image's ``file_name`` to be a non-empty relative path (no ``..``).

    Raises:
        InputError: naming ``source`` and the field, for a missing/empty ``images``/``annotations``/
            ``categories`` list, a missing or duplicate id, a bad ``bbox`` (not 4 finite numbers, or
            width/height <= 0), an unknown ``image_id`` or ``category_id``, or a bad ``area``/``iscrowd``
            (and the checks the flags add).
    """
    src = str(source) if source is not None else _GT_SOURCE
    if not isinstance(d, Mapping):
        raise InputError(src, None, f"must be a JSON object with images, annotations and categories, got {type(d).__name__}")
    images = _list_field(d, "images", src, False, "images")
    cats = _list_field(d, "categories", src, False, "categories")
    anns = _list_field(d, "annotations", src, False, "annotations (ground-truth objects; AP is undefined without any)")

    out_images, image_ids = [], set()
    for i, img in enumerate(images):
        _check_record(img, src, f"images[{i}]", "image", image_ids)
        for key in ("width", "height"):
            if boxes_in_image and key not in img:
                raise InputError(src, f"images[{i}].{key}", f"image id {img['id']}: missing")
            if key in img and not (is_number(img[key]) and img[key] > 0):
                raise InputError(src, f"images[{i}].{key}",
                                 f"image id {img['id']}: must be a positive number of pixels, got {img[key]!r}")
        if file_names:
            name = img.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise InputError(src, f"images[{i}].file_name", f"image id {img['id']}: must be a file name, got {name!r}")
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise InputError(src, f"images[{i}].file_name",
                                 f"image id {img['id']}: must be relative to the image folder, got {name!r}")
        image_ids.add(img["id"])
        out_images.append(dict(img))

    out_cats, cat_ids = [], set()
    for i, cat in enumerate(cats):
        _check_record(cat, src, f"categories[{i}]", "category", cat_ids)
        if "name" in cat and not isinstance(cat["name"], str):
            raise InputError(src, f"categories[{i}].name", f"category id {cat['id']}: must be a string, got {cat['name']!r}")
        cat_ids.add(cat["id"])
        out_cats.append({**cat, "name": cat.get("name", str(cat["id"]))})

    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in out_images}
    out_anns, ann_ids = [], set()
    for i, ann in enumerate(anns):
        f = f"annotations[{i}]"
        _check_record(ann, src, f, "annotation", ann_ids)
        ann_ids.add(ann["id"])
        what = f"annotation id {ann['id']}"
        if "image_id" not in ann:
            raise InputError(src, f"{f}.image_id", f"{what}: missing")
        if ann["image_id"] not in image_ids:
            raise InputError(src, f"{f}.image_id", f"{what}: unknown image id {ann['image_id']!r} (not in images)")
        what = f"annotation id {ann['id']} (image id {ann['image_id']})"
        if "category_id" not in ann:
            raise InputError(src, f"{f}.category_id", f"{what}: missing")
        if ann["category_id"] not in cat_ids:
            raise InputError(src, f"{f}.category_id",
                             f"{what}: unknown category id {ann['category_id']!r} (known: {sorted(cat_ids)})")
        if "bbox" not in ann:
            raise InputError(src, f"{f}.bbox", f"{what}: missing")
        bbox = _check_bbox(ann["bbox"], src, f"{f}.bbox", what=what)
        if boxes_in_image:
            w, h = sizes[ann["image_id"]]
            x, y, bw, bh = bbox
            tol = BOX_BORDER_TOLERANCE
            if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
                raise InputError(src, f"{f}.bbox", f"{what}: box {ann['bbox']!r} (x, y, width, height) reaches outside "
                                 f"its {w:g}x{h:g} image")
        area = ann.get("area", bbox[2] * bbox[3])
        if not (is_number(area) and area >= 0):
            raise InputError(src, f"{f}.area", f"{what}: must be a finite number >= 0, got {area!r}")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
            raise InputError(src, f"{f}.iscrowd", f"{what}: must be 0 or 1, got {iscrowd!r}")
        out_anns.append({**ann, "bbox": bbox, "area": float(area), "iscrowd": int(iscrowd)})
    return {**d, "images": out_images, "annotations": out_anns, "categories": out_cats}


def _read_json(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError(p, None, "file not found")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(p, None, f"not valid JSON: {e}") from None


def load_coco(path: str | Path, **checks: bool) -> dict:
    """Read and validate (:func:`validate_coco`, ``checks`` its flags) a COCO ground-truth json file."""
    return validate_coco(_read_json(path), path, **checks)


def validate_detections(dets: Any, gt: Mapping, source: str | Path | None = None) -> list[dict]:
    """Check COCO result records against a validated ground truth; returns a normalised copy.

    Raises:
        InputError: for a non-list, a record with an unknown ``image_id``/``category_id``, a bad ``bbox``
            (4 finite numbers, width/height >= 0) or a non-finite ``score``.
    """
    src = str(source) if source is not None else _DET_SOURCE
    if not isinstance(dets, list):
        raise InputError(src, None, f"detections must be a list of {{image_id, category_id, bbox, score}} records, got {type(dets).__name__}")
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    out = []
    for i, r in enumerate(dets):
        f = f"[{i}]"
        if not isinstance(r, Mapping):
            raise InputError(src, f, f"must be an object, got {type(r).__name__}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in r:
                raise InputError(src, f"{f}.{key}", "missing")
        if r["image_id"] not in image_ids:
            raise InputError(src, f"{f}.image_id", f"unknown image id {r['image_id']!r} (not in the ground truth)")
        if r["category_id"] not in cat_ids:
            raise InputError(src, f"{f}.category_id", f"unknown category id {r['category_id']!r} (known: {sorted(cat_ids)})")
        bbox = _check_bbox(r["bbox"], src, f"{f}.bbox", allow_zero=True)
        if not is_number(r["score"]):
            raise InputError(src, f"{f}.score", f"must be a finite number, got {r['score']!r}")
        out.append({"image_id": r["image_id"], "category_id": r["category_id"], "bbox": bbox, "score": float(r["score"])})
    return out


def load_detections(path: str | Path, gt: Mapping) -> list[dict]:
    """Read and validate a COCO results json file (a list of records) against ``gt``."""
    return validate_detections(_read_json(path), gt, path)


def evaluate_coco(
    gt: Mapping | str | Path,
    detections: Sequence[Detections] | Sequence[Mapping] | str | Path,
) -> dict:
    """COCO bbox metrics (pycocotools ``COCOeval``) of ``detections`` against ``gt``.

    Args:
        gt: a COCO ground-truth dict or the path of a COCO json file (validated either way).
        detections: per-image :class:`Detections` aligned with ``gt["images"]`` (same order), a list of COCO
            result records, or the path of a results json file.

    Returns:
        ``{"AP", "AP50", "AP75", "AR100"}`` (floats in [0, 1], IoU 0.5:0.95 unless named; area "all",
        100 detections per image), ``"per_class": {name: {"category_id", "AP", "AP50", "num_gt"}}`` (AP
        ``None`` for a class without ground truth), ``"num_images"``, ``"num_annotations"``,
        ``"num_detections"`` and ``"log"`` (pycocotools' printed summary). No detections give AP 0.
    """
    gt_d = load_coco(gt) if isinstance(gt, (str, Path)) else validate_coco(gt)
    if isinstance(detections, (str, Path)):
        res = load_detections(detections, gt_d)
    elif len(detections) and isinstance(detections[0], Detections):
        if len(detections) != len(gt_d["images"]):
            raise ValueError(f"got {len(detections)} detection lists for {len(gt_d['images'])} ground-truth images")
        res = detections_to_coco(detections, [img["id"] for img in gt_d["images"]])
        res = validate_detections(res, gt_d)
    else:
        res = validate_detections(list(detections), gt_d)

    # imported here, not at the top: only the metrics need pycocotools (a compiled package), so detector training
    # and the Neural-Sim loop run on machines where it is not installed
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats = sorted(gt_d["categories"], key=lambda c: c["id"])
    num_gt = {c["id"]: 0 for c in cats}
    for a in gt_d["annotations"]:
        if not a["iscrowd"]:
            num_gt[a["category_id"]] += 1
    out: dict[str, Any] = {"num_images": len(gt_d["images"]), "num_annotations": len(gt_d["annotations"]),
                           "num_detections": len(res)}
    if not res:
        out.update({"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR100": 0.0, "log": "no detections: all metrics are 0\n"})
        out["per_class"] = {c["name"]: {"category_id": c["id"], "AP": 0.0 if num_gt[c["id"]] else None,
                                        "AP50": 0.0 if num_gt[c["id"]] else None, "num_gt": num_gt[c["id"]]} for c in cats}
        return out

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = gt_d
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(res)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    fix = lambda v: max(float(v), 0.0)  # noqa: E731  (-1 = "no ground truth" cannot happen: annotations are non-empty)
    out.update({"AP": fix(stats[0]), "AP50": fix(stats[1]), "AP75": fix(stats[2]), "AR100": fix(stats[8])})
    precision = ev.eval["precision"]  # (T iou thresholds, R recall points, K classes, A areas, M max dets)
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        name = next(c["name"] for c in cats if c["id"] == cid)
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        per_class[name] = {
            "category_id": cid,
            "AP": float(np.mean(p[p > -1])) if (p > -1).any() else None,
            "AP50": float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else None,
            "num_gt": num_gt[cid],
        }
    out["per_class"] = per_class
    out["log"] = buf.getvalue()
    return out
