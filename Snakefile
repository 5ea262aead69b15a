# instsim: learn which synthetic training images to make.
# The rules live in workflow/rules/ by topic; workflow/rules/common.smk validates the config.
from snakemake.utils import min_version

min_version("8.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    cls="|".join(CLASSES),
    split="train|val|test",
    tsplit="val|test",
    strategy="uniform|oracle|neuralsim",
    seed=r"\d+",


include: "workflow/rules/data.smk"
include: "workflow/rules/target.smk"
include: "workflow/rules/nerf.smk"
include: "workflow/rules/detect.smk"
include: "workflow/rules/neuralsim.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
