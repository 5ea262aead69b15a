"""generate_dataset: render (procedural, blender) or import (folder) one class's BlenderNeRF dataset."""

from pathlib import Path

from instsim.stages.config import resolve_device
from instsim.stages.dataset import generate_procedural, import_folder
from instsim.stages.runner import run_stage


def main(sm):
    source = sm.params.source
    out_dir = Path(sm.output.transforms[0]).parent
    if source["source"] == "procedural":
        device = resolve_device(sm.params.device)
        generate_procedural(source["gesture"], out_dir, sm.params.dataset, sm.params.seed, device=device)
    elif source["source"] == "blender":
        from instsim.scene.blender import capture_blender_class

        # Blender's renders stay beside the dataset (the split folders link to them), checked like a folder class
        rendered, _ = capture_blender_class(source, sm.wildcards.cls, sm.params.dataset, sm.params.seed,
                                            out_dir / "blender")
        import_folder(rendered, out_dir, sm.params.dataset["val_fraction"])
    else:
        import_folder(source["path"], out_dir, sm.params.dataset["val_fraction"])


run_stage(snakemake, main)  # noqa: F821 (injected by Snakemake)
