# Config validation and input functions shared by all rules.
import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from instsim.stages.config import NERF_WORKFLOW_KEYS, check_config, gpu_jobs
from instsim.stages.coco_target import coco_source, target_source
from instsim.errors import InstsimError

SCHEMA = workflow.source_path("../schemas/config.schema.yaml")


def _config_sources():
    """The config files this run merged (the default config.yaml and every --configfile), for messages:
    a user must be told which file to fix, and Snakemake does not record which file a key came from."""
    files = [str(f) for f in getattr(workflow, "configfiles", [])]
    return ", ".join(files) if files else "config"


def _validate_config(config):
    """Schema check with a one-line message per problem (key path: reason), then cross-field checks.
    Every message names the config file(s) and the key."""
    sources = _config_sources()
    try:
        validate(config, schema=SCHEMA)
    except WorkflowError:
        with open(SCHEMA) as f:
            schema = yaml.safe_load(f)
        errors = jsonschema.Draft202012Validator(schema).iter_errors(config)
        lines = sorted(f"  {'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors)
        raise WorkflowError(
            f"Invalid config in {sources} (checked against workflow/schemas/config.schema.yaml):\n" + "\n".join(lines)
        )
    try:
        check_config(config, source=sources)
    except InstsimError as e:
        raise WorkflowError(f"Invalid config: {e}")


_validate_config(config)

RESULTS = config["results_dir"].rstrip("/")
CLASSES = list(config["classes"])
SPLITS = ["train", "val", "test"]
TARGET_SPLITS = ["val", "test"]
STRATEGIES = list(config["strategies"])
SEEDS = [str(s) for s in config["seeds"]]
TARGET_SOURCE = target_source(config)
# the target's pose distribution is known for a rendered target, and for a COCO one when the config gives it
TARGET_DISTRIBUTION_KNOWN = TARGET_SOURCE == "rendered" or "distribution_file" in config["target"]


# GPU stages ask for one GPU when the run uses CUDA, so the `gpu` resource keeps them from sharing one.
GPU_JOBS = gpu_jobs(config["device"])


# torch CPU threads a training stage may use (instsim.threads keeps it at the cores nobody else is using). On a CPU
# run 1: a second thread made a default-size NeRF step 5 % and a detector step 30 % faster on an idle 2-core
# machine (benchmarks/results/cpu_contention.json), so two one-thread jobs side by side get more done than one
# job with two. On a GPU run the threads build the detector's batches ahead of the GPU (instsim/detect/train.py).
STAGE_THREADS = 2 if GPU_JOBS else 1
DETECTOR_THREADS = 4 if GPU_JOBS else 1


def gpu_resources():
    """Resources of a GPU stage: `gpu` (1 when the run uses CUDA, else 0) and, when the config names a
    `gpu_model` and a GPU is asked for, that model (the SLURM plugin turns both into --gpus=<model>:1)."""
    resources = {"gpu": GPU_JOBS}
    if GPU_JOBS and config.get("gpu_model"):
        resources["gpu_model"] = config["gpu_model"]
    return resources


def nerf_settings(wildcards):
    """The NeRF settings of a class: the preset, the config's overrides, the run's device and seed."""
    nerf = config["nerf"]
    overrides = {k: v for k, v in nerf.items() if k not in NERF_WORKFLOW_KEYS}
    return {"preset": nerf["preset"], "overrides": overrides, "device": config["device"], "seed": config["seed"]}


def detector_inputs(wildcards):
    """A detector needs every class's validated NeRF and, except for `uniform`, its pose distribution."""
    inputs = {
        "checkpoints": expand(res("nerf/{cls}/checkpoint.pt"), cls=CLASSES),
        "validations": expand(res("nerf/{cls}/validation.json"), cls=CLASSES),
        "intrinsics": expand(res("data/{cls}/intrinsics.json"), cls=CLASSES),
    }
    if wildcards.strategy == "oracle":  # check_config allows oracle only where the distribution is known
        inputs["distribution"] = res("target/val/distribution.json")
    elif wildcards.strategy == "neuralsim":
        inputs["distribution"] = res("neuralsim/distribution.json")
    return inputs


def neuralsim_inputs(wildcards):
    """Every class's validated NeRF and camera facts, and the target's val split (images, COCO and, where it is
    known, the pose distribution: only the TV-to-target columns read it)."""
    inputs = {
        "checkpoints": expand(res("nerf/{cls}/checkpoint.pt"), cls=CLASSES),
        "validations": expand(res("nerf/{cls}/validation.json"), cls=CLASSES),
        "intrinsics": expand(res("data/{cls}/intrinsics.json"), cls=CLASSES),
        "annotations": res("target/val/annotations.json"),
        "images": res("target/val/images"),
    }
    if TARGET_DISTRIBUTION_KNOWN:
        inputs["distribution"] = res("target/val/distribution.json")
    return inputs


def target_outputs():
    """A target split's files: images and COCO annotations, and its pose distribution where that is known."""
    out = {"images": directory(res("target/{tsplit}/images")), "annotations": res("target/{tsplit}/annotations.json")}
    if TARGET_DISTRIBUTION_KNOWN:
        out["distribution"] = res("target/{tsplit}/distribution.json")
    return out


def coco_target_inputs(wildcards):
    """The user's COCO annotations file of the split (and the given distribution file), so edits rerun the import."""
    target = config["target"]
    inputs = {"annotations": str(coco_source(target[wildcards.tsplit], f"target.{wildcards.tsplit}").annotations)}
    if "distribution_file" in target:
        inputs["distribution"] = target["distribution_file"]
    return inputs


def neuralsim_params(update_psi, name):
    return {
        "classes": CLASSES,
        "pose_space": config["pose_space"],
        "target": config["target"],
        "detector": config["detector"],
        "neuralsim": config.get("neuralsim", {}),
        "device": config["device"],
        "run_seed": config["seed"],
        "update_psi": update_psi,
        # periodic checkpoints live outside the outputs, which Snakemake deletes when a job fails
        "resume": res(f"{name}/resume/state.pt"),
    }


def res(path):
    """A path under the results folder."""
    return f"{RESULTS}/{path}"


def class_source_files(wildcards):
    """The folder dataset's train json for folder classes, the .blend file of blender classes (so edits to them
    rerun the import or the render); none otherwise."""
    cls = config["classes"][wildcards.cls]
    if cls["source"] == "folder":
        return [f"{cls['path']}/transforms_train.json"]
    if cls["source"] == "blender":
        return [cls["blend"]]
    return []


def rendered_target_classes():
    """The classes as render_target sees them: a blender class has no renderer for new poses, so like a folder
    class it gives the target its own rendered views, those of its dataset under data/{cls}."""
    return {
        name: {"source": "folder", "path": res(f"data/{name}")} if cls["source"] == "blender" else cls
        for name, cls in config["classes"].items()
    }


def render_target_inputs(wildcards):
    """The datasets render_target draws views from for blender classes (rendered by generate_dataset), and every
    class's camera facts (its mean training-camera distance is the world units of one unit of zoom)."""
    blender = [name for name, cls in config["classes"].items() if cls["source"] == "blender"]
    return {
        "datasets": expand(res("data/{cls}/transforms_test.json"), cls=blender),
        "intrinsics": expand(res("data/{cls}/intrinsics.json"), cls=CLASSES),
    }


# Neural-Sim's report plots (its distribution.json is an input of the neuralsim strategy's detectors)
NEURALSIM_OUTPUTS = [
    res("neuralsim/probabilities.png"),
    res("neuralsim/learned_vs_target.png"),
    res("neuralsim/control_comparison.png"),
]


def all_outputs():
    """Targets of the default target: the final files of every stage that exists so far."""
    return [
        *expand(res("data/{cls}/intrinsics.json"), cls=CLASSES),
        *expand(res("nerf/{cls}/validation.json"), cls=CLASSES),
        res("eval/summary.tsv"),
        *expand(res("target/{tsplit}/annotations.json"), tsplit=TARGET_SPLITS),
        *(NEURALSIM_OUTPUTS if "neuralsim" in STRATEGIES else []),
    ]
