"""Render one object (or collection) of a ``.blend`` file at given cameras, headless, with Blender's ``bpy``.

Run by :mod:`instsim.scene.blender` as ``python blender_render.py job.json`` in a Python that has ``bpy`` (the
``[blender]`` extra, or another interpreter named by the class's ``python`` key): a process of its own, because
``bpy`` is one global Blender per process and needs ``numpy<2``, and so that a crash inside Blender is an exit
status, not a dead stage. It imports nothing but ``bpy`` and the standard library, so it is run by path, not
as a module of the instsim package.

The job (JSON): ``blend``, ``object`` or ``collection``, ``out_dir``, ``width``, ``height``, ``lens_mm``,
``sensor_mm``, ``engine`` (``cycles``, ``eevee``, ``workbench``), ``samples``, ``seed``, ``result`` (path of
the result JSON) and ``frames``: ``[{"file_path": "train/0001.png", "c2w": 4x4}]``, camera-to-world poses in
Blender's own convention (camera looks down its -z, y up: what BlenderNeRF writes) *about the object's centre*.

The capture is BlenderNeRF's Camera-on-Sphere: every other renderable object is hidden, the world and the
lights stay, the film is transparent (RGBA PNG, 8 bit, view transform Standard), the camera has the job's lens
and sensor width (sensor fit AUTO, principal point at the image centre) and looks at the object's
bounding-box centre from each pose shifted there. The result JSON holds ``centre`` (world) and the final
``frames`` (``file_path``, world ``c2w``), or ``error`` ({``field``, ``message``}) for a fault of the input.
"""

from __future__ import annotations

import json
import sys

ENGINES = {"cycles": ("CYCLES",), "eevee": ("BLENDER_EEVEE_NEXT", "BLENDER_EEVEE"), "workbench": ("BLENDER_WORKBENCH",)}
# object types that show up in a render: hidden unless they are what is captured
RENDERABLE = {"MESH", "CURVE", "SURFACE", "META", "FONT", "CURVES", "POINTCLOUD", "VOLUME", "GPENCIL", "GREASEPENCIL"}


class JobError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def _targets(bpy, job):
    if job.get("object"):
        obj = bpy.data.objects.get(job["object"])
        if obj is None:
            names = sorted(o.name for o in bpy.data.objects if o.type in RENDERABLE)
            raise JobError("object", f"no object named {job['object']!r} in the file (objects: {names})")
        return [obj, *[c for c in obj.children_recursive if c.type in RENDERABLE]]
    coll = bpy.data.collections.get(job["collection"])
    if coll is None:
        raise JobError("collection", f"no collection named {job['collection']!r} in the file "
                       f"(collections: {sorted(c.name for c in bpy.data.collections)})")
    objs = [o for o in coll.all_objects if o.type in RENDERABLE]
    if not objs:
        raise JobError("collection", f"collection {job['collection']!r} holds no renderable object")
    return objs


def _centre(targets):
    from mathutils import Vector

    corners = [o.matrix_world @ Vector(c) for o in targets for c in o.bound_box]
    lo = [min(c[i] for c in corners) for i in range(3)]
    hi = [max(c[i] for c in corners) for i in range(3)]
    return [(a + b) / 2 for a, b in zip(lo, hi)]


def _engine(bpy, scene, name: str, samples: int) -> None:
    ident = None
    for candidate in ENGINES[name]:  # the enum lists engines of add-ons (Cycles) only once set, so try each
        try:
            scene.render.engine = candidate
            ident = candidate
            break
        except TypeError:
            continue
    if ident is None:
        raise JobError("engine", f"{name!r} is not a render engine of this Blender (tried {list(ENGINES[name])})")
    if ident == "CYCLES":
        scene.cycles.device = "CPU"
        scene.cycles.samples = samples
        scene.cycles.use_adaptive_sampling = False
        scene.cycles.seed = 0
    elif ident.startswith("BLENDER_EEVEE"):
        scene.eevee.taa_render_samples = samples
    else:
        scene.display.render_aa = "8" if samples >= 8 else "OFF"


def render(job: dict) -> dict:
    import bpy
    from mathutils import Matrix

    try:
        bpy.ops.wm.open_mainfile(filepath=job["blend"])
    except RuntimeError as e:
        raise JobError("blend", f"Blender cannot open the file ({str(e).strip().splitlines()[-1]})") from None
    scene = bpy.context.scene
    targets = _targets(bpy, job)
    keep = {o.name for o in targets}
    for o in scene.objects:
        if o.type in RENDERABLE and o.name not in keep:
            o.hide_render = True
    for o in targets:
        o.hide_render = False
    centre = _centre(targets)

    cam_data = bpy.data.cameras.new("instsim_camera")
    cam_data.lens = float(job["lens_mm"])
    cam_data.sensor_width = float(job["sensor_mm"])
    cam_data.sensor_fit = "AUTO"
    cam_data.shift_x = cam_data.shift_y = 0.0
    cam_data.clip_start, cam_data.clip_end = 0.01, 1000.0
    cam = bpy.data.objects.new("instsim_camera", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam

    r = scene.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = int(job["width"]), int(job["height"]), 100
    r.pixel_aspect_x = r.pixel_aspect_y = 1.0
    r.film_transparent = True
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGBA"
    r.image_settings.color_depth = "8"
    scene.view_settings.view_transform = "Standard"
    _engine(bpy, scene, job["engine"], int(job["samples"]))

    frames = []
    for fr in job["frames"]:
        c2w = [list(row) for row in fr["c2w"]]
        for i in range(3):
            c2w[i][3] += centre[i]
        cam.matrix_world = Matrix(c2w)
        bpy.context.view_layer.update()
        r.filepath = f"{job['out_dir']}/{fr['file_path']}"
        bpy.ops.render.render(write_still=True)
        frames.append({"file_path": fr["file_path"], "c2w": [list(row) for row in cam.matrix_world]})
    return {"centre": centre, "frames": frames, "blender": bpy.app.version_string, "engine": scene.render.engine}


def main(argv: list[str]) -> int:
    job = json.loads(open(argv[1]).read())
    try:
        result = render(job)
        code = 0
    except JobError as e:
        result, code = {"error": {"field": e.field, "message": e.message}}, 3
    with open(job["result"], "w") as f:
        json.dump(result, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
