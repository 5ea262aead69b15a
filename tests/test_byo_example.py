"""configs/byo_example.yaml, the README's worked "bring your own data" config, is valid: the schema, the cross-field
checks (its COCO splits found and matched to its classes, its oracle distribution of the config's bins), a dry
run of the whole workflow and Snakemake's lint of its rules."""

import json

import jsonschema
import pytest
import yaml

from conftest import REPO
from instsim.stages.config import check_config
from test_style import ALLOWED_LINT, lint_findings
from workflow_utils import run_snakemake, slurm_helpers

EXAMPLE = REPO / "configs" / "byo_example.yaml"
runs = slurm_helpers("runs")


def _config() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_passes_schema_and_checks(monkeypatch):
    cfg = _config()
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    assert not [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(cfg)]
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where the README runs it
    check_config(cfg)
    assert cfg["target"]["source"] == "coco" and {c["source"] for c in cfg["classes"].values()} == {"folder"}


@pytest.mark.workflow
def test_example_plans_the_whole_workflow(tmp_path):
    cfg = _config()
    for cls in cfg["classes"].values():
        cls["path"] = str(REPO / cls["path"])
    for key in ("val", "test", "distribution_file"):
        cfg["target"][key] = str(REPO / cfg["target"][key])
    proc = run_snakemake(tmp_path, cfg, "--dry-run")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rules = {j.rule for j in runs.parse_jobs(proc.stdout + "\n" + proc.stderr)}
    assert {"import_coco_target", "generate_dataset", "train_nerf", "optimize_distribution", "summarize"} <= rules
    assert json.loads((REPO / cfg["target"]["distribution_file"]).read_text())["pose_space"] == cfg["pose_space"]
    # the rules of a COCO target (import_coco_target instead of render_target) pass Snakemake's lint too
    lint = run_snakemake(tmp_path, cfg, "--lint")
    findings = lint_findings(lint.stdout + "\n" + lint.stderr)
    assert any("import_coco_target" in where for where, _, _ in findings), lint.stdout[-3000:]
    assert not [f for f in findings if f[1] != ALLOWED_LINT], findings
