"""``source: blender`` classes (instsim/scene/blender.py): a .blend made here (a cube and a cone) becomes a BlenderNeRF
dataset through Blender itself and trains a NeRF that passes validation.

Runs wherever ``bpy`` can be had: in this interpreter (the ``[blender]`` extra), or in the one named by the
environment variable INSTSIM_BPY_PYTHON (.ci/run makes a venv with bpy, which pins numpy<2, beside the test
environment); skipped otherwise. The config-level tests at the bottom need no Blender."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import fields

import imageio.v3 as iio
import numpy as np
import pytest
import yaml

from conftest import REPO
from instsim.errors import ConfigError, InputError
from instsim.scene.blender import BLENDER_KEYS, BlenderCapture, capture_blender_class
from instsim.stages.config import check_config
from instsim.transforms import read_transforms
from workflow_utils import run_snakemake, tiny_config


def _bpy_python() -> str | None:
    if importlib.util.find_spec("bpy") is not None:
        return sys.executable
    return os.environ.get("INSTSIM_BPY_PYTHON") or None


BPY_PYTHON = _bpy_python()
needs_bpy = pytest.mark.skipif(BPY_PYTHON is None, reason="bpy not importable here and INSTSIM_BPY_PYTHON not set")

# A red cube at the origin and a blue cone beside it, both in collection "Shapes"; a sun and a grey world.
MAKE_BLEND = """
import sys
import bpy

bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
shapes = bpy.data.collections.new("Shapes")
scene.collection.children.link(shapes)


def add(op, name, rgb, **kw):
    op(**kw)
    obj = bpy.context.object
    obj.name = name
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    mat.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (*rgb, 1.0)
    obj.data.materials.append(mat)
    for c in obj.users_collection:
        c.objects.unlink(obj)
    shapes.objects.link(obj)


add(bpy.ops.mesh.primitive_cube_add, "Cube", (0.8, 0.1, 0.05), size=1.0, location=(0, 0, 0))
add(bpy.ops.mesh.primitive_cone_add, "Cone", (0.05, 0.2, 0.8), radius1=0.6, depth=1.4, location=(2.0, 0, 0))
bpy.ops.object.light_add(type="SUN", rotation=(0.7, 0.2, 0.5))
bpy.context.object.data.energy = 3.0
scene.world = bpy.data.worlds.new("grey")
scene.world.color = (0.35, 0.35, 0.35)
bpy.ops.wm.save_as_mainfile(filepath=sys.argv[1])
"""


@pytest.fixture(scope="module")
def blend_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blend")
    script = folder / "make_blend.py"
    script.write_text(MAKE_BLEND)
    proc = subprocess.run([BPY_PYTHON, str(script), str(folder / "shapes.blend")], capture_output=True, text=True,
                          cwd=folder, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return folder / "shapes.blend"


def _blender_class(blend, **kw):
    cls = {"source": "blender", "blend": str(blend), "samples": 16, **kw}
    if BPY_PYTHON != sys.executable:
        cls["python"] = BPY_PYTHON
    return cls


@needs_bpy
def test_blend_becomes_a_dataset_and_trains_a_valid_nerf(tmp_path, blend_file):
    cfg = tiny_config(classes={"cone": _blender_class(blend_file, object="Cone")})
    proc = run_snakemake(tmp_path, cfg, "results/nerf/cone/validation.json", "results/data/cone/intrinsics.json",
                         "results/target/val/annotations.json")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    # a rendered target draws the blender class's own rendered views (it has no renderer for new poses)
    target = json.loads((tmp_path / "results/target/val/annotations.json").read_text())
    assert [c["name"] for c in target["categories"]] == ["cone"]
    assert len(target["annotations"]) == tiny_config()["target"]["images"]["val"]
    data = tmp_path / "results/data/cone"
    views = tiny_config()["dataset"]["views"]
    for split in ("train", "val", "test"):
        tf = read_transforms(data / f"transforms_{split}.json")  # the folder checks: images, poses, camera
        assert len(tf.frames) == views[split]
    raw = json.loads((data / "blender" / "transforms_train.json").read_text())
    assert raw["blender"]["engine"] == "CYCLES" and raw["aabb_scale"] == 4
    # the cone's bounding-box centre, (2, 0, 0.0): cameras at dataset.radius around it
    assert raw["blender"]["centre"] == pytest.approx([2.0, 0.0, 0.0], abs=1e-4)
    for fr in raw["frames"]:
        pos = np.array(fr["transform_matrix"])[:3, 3]
        assert np.linalg.norm(pos - [2.0, 0.0, 0.0]) == pytest.approx(3.0, abs=1e-4)
    img = iio.imread(data / "train" / "0001.png")
    assert img.shape == (48, 48, 4)
    alpha = img[..., 3] > 128
    assert 0.02 < alpha.mean() < 0.6 and not alpha[0].any() and not alpha[-1].any()  # framed, not cut
    rgb = img[alpha][:, :3].astype(float).mean(0)
    assert rgb[2] > rgb[0]  # the blue cone, not the red cube (hidden)
    info = json.loads((data / "intrinsics.json").read_text())
    assert info["radius"]["mean"] == pytest.approx(3.0, abs=1e-3)
    v = json.loads((tmp_path / "results/nerf/cone/validation.json").read_text())
    assert v["passed"] and v["psnr"] >= tiny_config()["nerf"]["min_psnr"]


@needs_bpy
def test_collection_capture_and_missing_object(tmp_path, blend_file):
    ds = {**tiny_config()["dataset"], "views": {"train": 2, "val": 1, "test": 1}}
    folder, counts = capture_blender_class(_blender_class(blend_file, collection="Shapes", radius=4.0, lens_mm=35.0,
                                                          upper_hemisphere=True, engine="workbench"),
                                           "shapes", ds, 0, tmp_path / "render")
    assert counts == {"train": 2, "val": 1, "test": 1}
    raw = json.loads((folder / "transforms_train.json").read_text())
    assert raw["blender"]["centre"] == pytest.approx([1.05, 0.0, 0.0], abs=1e-4)  # box: x from -0.5 to 2.6
    assert raw["fl_x"] == pytest.approx(35.0 / 36.0 * 48)
    assert all(fr["transform_matrix"][2][3] >= -1e-6 for fr in raw["frames"])  # upper hemisphere
    with pytest.raises(InputError) as e:
        capture_blender_class(_blender_class(blend_file, object="Teapot"), "pot", ds, 0, tmp_path / "pot")
    assert e.value.field == "classes.pot.object" and "'Teapot'" in e.value.message and "Cone" in e.value.message
    assert not (tmp_path / "pot").exists()


def test_schema_defaults_are_the_library_defaults():
    """Each blender key is in the schema; a default its description names is BlenderCapture's (the schema itself
    sets none: Snakemake's validate would write it into every class, folder and procedural ones too)."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["definitions"]["class_source"]["properties"]
    defaults = {f.name: f.default for f in fields(BlenderCapture)}
    named = 0
    for key in BLENDER_KEYS:
        assert key in props and "default" not in props[key], key
        m = re.search(r"default ([\w.]+)\)", props[key].get("description", ""))
        if m and not m.group(1).startswith("dataset"):
            named += 1
            assert m.group(1) == str(defaults[key]), key
    assert named == 4  # sensor_mm, engine, samples, aabb_scale
    assert props["engine"]["enum"] == ["cycles", "eevee", "workbench"] and "blender" in props["source"]["enum"]


def test_blender_class_config_errors(tmp_path):
    blend = tmp_path / "scene.blend"
    cfg = tiny_config(classes={"cone": {"source": "blender", "blend": str(blend), "object": "Cone"}})
    with pytest.raises(ConfigError, match="classes.cone.blend"):
        check_config(cfg)
    blend.write_bytes(b"BLENDER")  # exists; not opened at config time
    cfg["classes"]["cone"]["collection"] = "Shapes"
    with pytest.raises(ConfigError, match="exactly one of object or collection"):
        check_config(cfg)
    cfg = tiny_config(classes={"fist": {"source": "procedural", "gesture": "fist", "samples": 8}})
    with pytest.raises(ConfigError, match="classes.fist.samples.*belongs to source blender"):
        check_config(cfg)
    cfg = tiny_config(classes={"cone": {"source": "blender", "blend": str(blend), "object": "Cone",
                                        "python": str(tmp_path / "no-python")}})
    with pytest.raises(ConfigError, match="classes.cone.python"):
        check_config(cfg)
