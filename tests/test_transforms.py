import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from instsim.cameras import Intrinsics
from instsim.errors import InputError
from instsim.stages.intrinsics import extract_intrinsics
from instsim.transforms import load_views, read_transforms, write_transforms

from conftest import BLENDERNERF_TINY


def _edit(folder: Path, fn, split: str = "train") -> Path:
    path = folder / f"transforms_{split}.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))
    return path


def test_reads_real_blendernerf_dataset():
    tf = read_transforms(BLENDERNERF_TINY / "transforms_train.json")
    assert len(tf.frames) == 30 and tf.aabb_scale == 4.0
    assert tf.intrinsics == Intrinsics(64, 64, 88.88888888888889, 88.88888888888889, 32.0, 32.0)
    views = load_views(BLENDERNERF_TINY / "transforms_test.json")
    assert views.images.shape == (8, 64, 64, 4) and views.poses.shape == (8, 4, 4)
    assert 0.1 < float((views.images[..., 3] > 0).float().mean()) < 0.4


def test_write_read_round_trip_without_extension(tmp_path):
    (tmp_path / "train").mkdir()
    iio.imwrite(tmp_path / "train" / "r_0.png", np.zeros((6, 8, 4), np.uint8))
    intr = Intrinsics.from_fov(8, 6, 0.9)
    c2w = torch.eye(4)
    c2w[2, 3] = 3.0
    write_transforms(tmp_path / "transforms_train.json", intr, [("./train/r_0", c2w)], aabb_scale=2)
    tf = read_transforms(tmp_path / "transforms_train.json")
    assert tf.frames[0].image_path.name == "r_0.png"
    assert tf.intrinsics.fl_x == pytest.approx(intr.fl_x) and tf.aabb_scale == 2
    assert np.allclose(tf.frames[0].c2w, c2w.numpy())


def _set_frame0(key, value):
    def fn(meta):
        meta["frames"][0][key] = value

    return fn


def _del_frame0(key):
    def fn(meta):
        del meta["frames"][0][key]

    return fn


def _non_rigid(meta):
    meta["frames"][2]["transform_matrix"][0][0] = 2.0


def _nan_pose(meta):
    meta["frames"][1]["transform_matrix"][1][3] = float("nan")


BAD_CASES = {
    "missing transform_matrix": (_del_frame0("transform_matrix"), "frames[0].transform_matrix", "missing"),
    "missing file_path": (_del_frame0("file_path"), "frames[0].file_path", "missing"),
    "non-rigid matrix": (_non_rigid, "frames[2].transform_matrix", "rigid"),
    "NaN in matrix": (_nan_pose, "frames[1].transform_matrix", "NaN"),
    "3x4 matrix": (_set_frame0("transform_matrix", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]), "frames[0].transform_matrix", "4x4"),
    "missing image": (_set_frame0("file_path", "train/nope.png"), "frames[0].file_path", "not found"),
    "no frames": (lambda m: m.update(frames=[]), "frames", "empty"),
    "frames not a list": (lambda m: m.update(frames={}), "frames", "list"),
    "no focal length": (lambda m: [m.pop(k) for k in ("fl_x", "fl_y", "camera_angle_x", "camera_angle_y")], "fl_x", "missing"),
    "missing w": (lambda m: m.pop("w"), "w", "missing"),
    "mixed cameras": (_set_frame0("fl_x", 50.0), "frames[0].fl_x", "different cameras"),
    "wrong w": (lambda m: m.update(w=32.0, cx=16.0), "frames[0].file_path", "w x h"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_transforms_name_file_frame_and_field(blendernerf_copy, case):
    fn, field, msg = BAD_CASES[case]
    path = _edit(blendernerf_copy, fn)
    with pytest.raises(InputError) as err:
        read_transforms(path)
    assert err.value.field == field, str(err.value)
    assert msg in str(err.value)
    assert str(path) in str(err.value) or path.name in str(err.value)


def test_truncated_json(blendernerf_copy):
    path = blendernerf_copy / "transforms_train.json"
    path.write_text(path.read_text()[:500])
    with pytest.raises(InputError, match="not valid JSON"):
        read_transforms(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_image(blendernerf_copy, damage):
    img = blendernerf_copy / "train" / "0003.png"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"not a png at all")
    with pytest.raises(InputError) as err:
        read_transforms(blendernerf_copy / "transforms_train.json")
    assert "0003.png" in str(err.value) and err.value.field == "frames[2].file_path"


def test_extract_intrinsics_of_real_dataset():
    info = extract_intrinsics(BLENDERNERF_TINY / "transforms_train.json")
    assert info["w"] == 64 and info["fl_x"] == pytest.approx(88.889, abs=1e-3)
    assert info["radius"]["min"] == pytest.approx(3.5, abs=1e-3) and info["radius"]["max"] == pytest.approx(3.5, abs=1e-3)
    assert np.allclose(info["centre"], 0.0, atol=1e-3)
    # the torus and cone reach ~1.0 from the origin; the frustum intersection must contain them and stay tight
    assert 1.0 < info["scene"]["bound"] < 1.6
    assert info["scene"]["aabb_scale"] == 4.0
    json.dumps(info)  # JSON-able
