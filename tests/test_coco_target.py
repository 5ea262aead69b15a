"""The COCO target import (instsim/stages/coco_target.py): real-export quirks of the Blender fixture, image modes and
sizes, boxes that follow their pixels through letterbox and stretch, and the config checks of a COCO target.
The bad-input cases (missing images, bad boxes, duplicate ids, ...) are in tests/reliability/reliability_cases.py."""

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from conftest import BLENDER_COCO_TINY
from instsim.detect import load_coco
from instsim.errors import ConfigError, InputError
from instsim.stages.coco_target import CocoSource, coco_source, fit_transform, import_coco_target
from instsim.stages.config import check_config
from workflow_utils import byo_config

VAL = BLENDER_COCO_TINY / "target" / "val"


def _import(tmp_path, source, classes=("chair", "lamp"), size=48, resize="letterbox"):
    out = tmp_path / "out"
    counts = import_coco_target(source, list(classes), size, resize, out / "images", out / "annotations.json", "val")
    return counts, load_coco(out / "annotations.json", boxes_in_image=True, file_names=True), out


def test_quirky_export_imports(tmp_path):
    """annotations_quirky.json: info/licenses, categories [7 lamp, 3 chair], image 5 without annotation, a float box."""
    quirky = json.loads((VAL / "annotations_quirky.json").read_text())
    counts, coco, out = _import(tmp_path, CocoSource(VAL / "annotations_quirky.json", VAL / "images"))
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "chair"), (2, "lamp")]
    assert len(coco["images"]) == 16 and len(coco["annotations"]) == 15
    assert counts == {"chair": 6, "lamp": 9}
    # image id 5 (a chair nobody annotated) is kept, without an object
    img5 = next(i for i in coco["images"] if i["source"]["id"] == 5)
    assert not [a for a in coco["annotations"] if a["image_id"] == img5["id"]]
    # categories matched by name: every lamp (source id 7) is our 2, every chair (3) our 1
    src_cat = {a["id"]: a["category_id"] for a in quirky["annotations"]}
    for a in coco["annotations"]:
        assert a["category_id"] == {7: 2, 3: 1}[src_cat[a["source_id"]]]
    # the float box of image 10, scaled 64 -> 48 exactly
    img10 = next(i for i in coco["images"] if i["source"]["id"] == 10)
    (box,) = [a["bbox"] for a in coco["annotations"] if a["image_id"] == img10["id"]]
    src = [24.695531887752615, 4.873309288697552, 31.722994880744857, 47.11529797039837]
    assert box == pytest.approx([v * 0.75 for v in src], abs=1e-9)
    assert img10["transform"] == {"scale": [0.75, 0.75], "offset": [0, 0]}
    img = iio.imread(out / "images" / img10["file_name"])
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert coco["import"]["category_ids"] == {"chair": {"source": 3, "target": 1}, "lamp": {"source": 7, "target": 2}}


def test_plain_fixture_matches_quirky_boxes(tmp_path):
    """The fixture's plain and quirky files describe the same boxes (integer vs exact): the imports agree to 1 px."""
    _, plain, _ = _import(tmp_path / "a", CocoSource(VAL / "annotations.json", VAL / "images"))
    _, quirky, _ = _import(tmp_path / "b", CocoSource(VAL / "annotations_quirky.json", VAL / "images"))
    by_src = {a["source_id"]: a for a in plain["annotations"]}
    assert len(plain["annotations"]) == 16
    for a in quirky["annotations"]:
        p = by_src[a["source_id"]]
        assert a["category_id"] == p["category_id"]
        assert np.allclose(a["bbox"], p["bbox"], atol=1.0)


def _modes_set(folder):
    """Three images of other sizes and modes in subfolders, each a black picture with one bright rectangle, and a
    COCO json (ids 40, 12, 7; categories [9 b, 4 a]) boxing each rectangle; one extra image without annotation."""
    specs = [  # (id, file name, width, height, mode, box x, y, w, h)
        (40, "cam1/wide.png", 80, 40, "RGBA", 10, 8, 30, 20),
        (12, "cam2/deep/tall.png", 30, 60, "L", 5, 30, 20, 24),
        (7, "pal.bmp", 50, 50, "P", 20, 2, 10, 40),
        (99, "empty.png", 64, 32, "RGB", None, None, None, None),
    ]
    images, anns = [], []
    for k, (iid, name, w, h, mode, x, y, bw, bh) in enumerate(specs):
        arr = np.zeros((h, w, 4), np.uint8)
        arr[..., 3] = 255
        if x is not None:
            arr[y : y + bh, x : x + bw, :3] = 255
            anns.append({"id": 100 + k, "image_id": iid, "category_id": 9 if k % 2 else 4, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0, "segmentation": []})
        path = folder / "imgs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, "RGBA").convert(mode).save(path)
        images.append({"id": iid, "file_name": name, "width": w, "height": h})
    coco = {"info": {"year": 2026}, "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": 9, "name": "b"}, {"id": 4, "name": "a"}]}
    (folder / "export.json").write_text(json.dumps(coco))
    return CocoSource(folder / "export.json", folder / "imgs")


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_boxes_follow_their_pixels_for_any_size_and_mode(tmp_path, resize):
    """RGBA, grey, palette and RGB images of other sizes: each written box frames the bright rectangle."""
    _, coco, out = _import(tmp_path, _modes_set(tmp_path), classes=("a", "b"), size=40, resize=resize)
    assert [i["source"]["id"] for i in coco["images"]] == [7, 12, 40, 99]  # source id order
    assert len(coco["annotations"]) == 3
    for ann in coco["annotations"]:
        img = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        arr = iio.imread(out / "images" / img["file_name"]).astype(float) / 255
        assert arr.shape == (40, 40, 3)
        ys, xs = np.nonzero(arr.mean(-1) > 0.75)  # the rectangle, not the grey bars (0.5) or black
        x, y, w, h = ann["bbox"]
        assert xs.min() == pytest.approx(x, abs=1.0) and xs.max() + 1 == pytest.approx(x + w, abs=1.0)
        assert ys.min() == pytest.approx(y, abs=1.0) and ys.max() + 1 == pytest.approx(y + h, abs=1.0)
        assert ann["area"] == pytest.approx(w * h)  # the source area (w * h there) scaled like the box
        sx, sy = img["transform"]["scale"]
        square = img["source"]["width"] == img["source"]["height"]
        if resize == "letterbox":
            assert sx == pytest.approx(sy, rel=0.05)  # aspect kept
            assert square or np.allclose(arr[0, 0], 0.5, atol=0.01)  # a grey bar in the corner
        else:
            assert (sx == sy) == square


def test_fit_transform_letterbox_and_stretch():
    assert fit_transform(80, 40, 40, "letterbox") == (0.5, 0.5, 0, 10, 40, 20)
    assert fit_transform(30, 60, 40, "letterbox") == (20 / 30, 40 / 60, 10, 0, 20, 40)
    assert fit_transform(80, 40, 40, "stretch") == (0.5, 1.0, 0, 0, 40, 40)
    with pytest.raises(ValueError, match="unknown resize mode"):
        fit_transform(8, 8, 8, "crop")


def test_split_folder_finds_its_json_and_images(tmp_path):
    src = coco_source(str(VAL), "target.val")
    assert src == CocoSource(VAL / "annotations.json", VAL / "images")
    lone = tmp_path / "roboflow"
    lone.mkdir()
    (lone / "_annotations.coco.json").write_text("{}")
    assert coco_source(str(lone), "target.val") == CocoSource(lone / "_annotations.coco.json", lone)
    (lone / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match="target.val"):
        coco_source(str(lone), "target.val")
    with pytest.raises(ConfigError, match="does not exist"):
        coco_source({"annotations": str(tmp_path / "none.json")}, "target.test")


def test_config_checks_of_a_coco_target(tmp_path):
    check_config(byo_config())  # the fixture's config is valid
    cfg = byo_config(resize="stretch")
    cfg["target"]["images"] = {"val": 4, "test": 4}
    with pytest.raises(ConfigError, match="target.images.*belongs to target.source rendered"):
        check_config(cfg)
    # without a distribution file the oracle is refused, uniform + neuralsim alone is fine
    cfg = byo_config()
    cfg["target"].pop("distribution_file")
    with pytest.raises(ConfigError, match="oracle"):
        check_config(cfg)
    cfg["strategies"] = ["uniform", "neuralsim"]
    check_config(cfg)
    # a test split sharing images with val is not held out
    test = tmp_path / "test.json"
    shutil.copyfile(BLENDER_COCO_TINY / "target" / "test" / "annotations.json", test)
    with pytest.raises(ConfigError, match="target.test.*shares 16 images with target.val"):
        check_config(byo_config(test={"annotations": str(test), "images": str(VAL / "images")}))
