"""One source of truth for settings: the config schema (workflow/schemas/config.schema.yaml), the default
config.yaml and the library's dataclasses say the same thing.

* every enum of the schema is a tuple of the library, and the same values;
* the keys of each section backed by a dataclass are that dataclass's fields;
* config.yaml's values are the dataclasses' defaults (a caller of the library without Snakemake gets the
  settings the default run uses); the schema itself states no defaults, so there is no third copy;
* each bound of the schema (minimum, maximum, exclusive ones) is where the dataclass's own validation draws
  the line too.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import yaml

from instsim.backend import BACKENDS, DEVICES
from instsim.poses import BinnedFactor, PoseSpace
from instsim.detect import DetectorConfig
from instsim.errors import InputError
from instsim.nerf.config import PRESETS, NerfConfig
from instsim.nerf.rendering import BACKGROUNDS
from instsim.neuralsim.estimator import BASELINES, ESTIMATORS
from instsim.neuralsim.config import INVERSE_HVP_METHODS, PSI_LR_SCHEDULES, InverseHVPConfig, NeuralSimConfig
from instsim.neuralsim.distribution import PoseDistribution
from instsim.neuralsim.sampling import RELAXATIONS
from instsim.scene import GESTURES
from instsim.scene.blender import ENGINES
from instsim.stages.coco_target import RESIZE_MODES, TARGET_SOURCES
from instsim.stages.config import NERF_WORKFLOW_KEYS, nerf_config
from instsim.stages.dataset import CLASS_SOURCES
from instsim.stages.strategies import STRATEGIES, detector_config

from conftest import REPO

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
PROPS = SCHEMA["properties"]


def _node(path: str) -> dict:
    """The schema node at a dotted path of property names (``definitions.x`` for a definition)."""
    node: Any = SCHEMA
    parts = path.split(".")
    if parts[0] == "definitions":
        node, parts = SCHEMA["definitions"][parts[1]], parts[2:]
    for part in parts:
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


#: schema path of each enum (``[]``: the array's items) -> the library tuple that defines it
ENUMS: dict[str, tuple] = {
    "device": DEVICES,
    "definitions.class_source.source": CLASS_SOURCES,
    "definitions.class_source.gesture": GESTURES,
    "definitions.class_source.engine": ENGINES,
    "target.source": TARGET_SOURCES,
    "target.resize": RESIZE_MODES,
    "nerf.preset": PRESETS,
    "nerf.backend": BACKENDS,
    "nerf.validation_background": tuple(BACKGROUNDS),
    "strategies.[]": STRATEGIES,
    "neuralsim.relaxation": RELAXATIONS,
    "neuralsim.learned.[]": PoseSpace.FACTORS,
    "neuralsim.inverse_hvp.method": INVERSE_HVP_METHODS,
    "neuralsim.psi_lr_schedule": PSI_LR_SCHEDULES,
    "neuralsim.estimator": ESTIMATORS,
    "neuralsim.baseline": BASELINES,
}


def _schema_enums(node: Any, path: str) -> dict[str, list]:
    """Every ``enum`` below ``node``, by the dotted path :func:`_node` reads."""
    found: dict[str, list] = {}
    if isinstance(node, Mapping):
        if "enum" in node:
            found[path] = node["enum"]
        for key, sub in node.get("properties", {}).items():
            found.update(_schema_enums(sub, f"{path}.{key}" if path else key))
        if isinstance(node.get("items"), Mapping):
            found.update(_schema_enums(node["items"], f"{path}.[]"))
    return found


def _all_schema_enums() -> dict[str, list]:
    found = _schema_enums(SCHEMA, "")
    for name, node in SCHEMA["definitions"].items():
        found.update(_schema_enums(node, f"definitions.{name}"))
    return found


def test_every_schema_enum_is_a_library_tuple():
    """Adding an enum to the schema without naming its library tuple here fails, and so does a value that only one
    side knows."""
    found = _all_schema_enums()
    assert sorted(found) == sorted(ENUMS)
    for path, values in found.items():
        assert len(set(values)) == len(values), path
        assert set(values) == set(ENUMS[path]), f"{path}: schema {values} vs library {list(ENUMS[path])}"


def test_factor_names_are_the_pose_spaces():
    for path in ("pose_space", "target.distribution"):
        node = _node(path)
        assert set(node["required"]) == set(node["properties"]) == set(PoseSpace.FACTORS), path
    factor_keys = {f.name for f in dataclasses.fields(BinnedFactor)} - {"name"}
    assert set(SCHEMA["definitions"]["factor"]["properties"]) == factor_keys


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_section_keys_are_the_dataclass_fields():
    # neuralsim and its inverse_hvp are closed sections: every key is a field and every field a key
    assert set(_node("neuralsim")["properties"]) == _field_names(NeuralSimConfig)
    assert set(_node("neuralsim.inverse_hvp")["properties"]) == _field_names(InverseHVPConfig)
    # nerf: the workflow's keys, plus the NerfConfig fields the schema types (others pass to NerfConfig by name)
    nerf = _node("nerf")
    assert set(nerf["required"]) == set(NERF_WORKFLOW_KEYS)
    assert set(nerf["properties"]) - set(NERF_WORKFLOW_KEYS) <= _field_names(NerfConfig)
    assert not set(NERF_WORKFLOW_KEYS) & _field_names(NerfConfig)
    assert set(_node("detector.settings")["properties"]) <= _field_names(DetectorConfig)


def _has_default(node: Any) -> list[str]:
    if not isinstance(node, Mapping):
        return []
    out = ["default"] if "default" in node else []
    for key, sub in node.get("properties", {}).items():
        out += [f"{key}.{p}" for p in _has_default(sub)]
    return out


def test_the_schema_states_no_defaults():
    """The dataclasses hold the defaults; a ``default:`` in the schema would be a second copy that can drift."""
    assert _has_default(SCHEMA) == []
    for node in SCHEMA["definitions"].values():
        assert _has_default(node) == []


def test_config_yaml_is_the_library_defaults():
    """Every dataclass-backed section of config.yaml equals what the library does when given nothing."""
    assert NeuralSimConfig.from_dict(CONFIG["neuralsim"]) == NeuralSimConfig()
    # the learned factors are also PoseDistribution's default
    assert tuple(inspect.signature(PoseDistribution).parameters["learned"].default) == NeuralSimConfig().learned
    det = CONFIG["detector"]
    assert detector_config(det["settings"], CONFIG["target"]["image_size"], len(CONFIG["classes"]), CONFIG["seed"]) \
        == DetectorConfig()
    nerf = CONFIG["nerf"]
    overrides = {k: v for k, v in nerf.items() if k not in NERF_WORKFLOW_KEYS}
    assert nerf["preset"] == "cpu" and nerf_config(nerf["preset"], overrides) == NerfConfig.cpu()
    assert PoseSpace.from_config(CONFIG["pose_space"]).to_dict() == CONFIG["pose_space"]


# ---------------------------------------------------------------------------------------------------------
# the schema's bounds are the dataclasses' bounds
# ---------------------------------------------------------------------------------------------------------


def _neuralsim(key: str, value: Any) -> None:
    NeuralSimConfig.from_dict({**CONFIG["neuralsim"], key: value})


def _inverse_hvp(key: str, value: Any) -> None:
    NeuralSimConfig.from_dict({**CONFIG["neuralsim"], "inverse_hvp": {**CONFIG["neuralsim"]["inverse_hvp"], key: value}})


def _detector(key: str, value: Any) -> None:
    det = CONFIG["detector"]
    detector_config({**det["settings"], key: value}, CONFIG["target"]["image_size"], len(CONFIG["classes"]), 0)


def _nerf(key: str, value: Any) -> None:
    nerf_config(CONFIG["nerf"]["preset"], {key: value})


def _factor(key: str, value: Any) -> None:
    space = {f: dict(v) for f, v in CONFIG["pose_space"].items()}
    space["azimuth"][key] = value
    PoseSpace.from_config(space)


#: sections whose every bounded numeric key is checked: schema path -> builds the dataclass with one key changed
BOUNDED: dict[str, Callable[[str, Any], None]] = {
    "neuralsim": _neuralsim,
    "neuralsim.inverse_hvp": _inverse_hvp,
    "detector.settings": _detector,
    "nerf": _nerf,
    "definitions.factor": _factor,
}


def _bound_cases() -> list[tuple[str, str, Any, bool]]:
    """``(section, key, value, accepted)`` at and beyond every bound the schema states for a dataclass field."""
    cases = []
    for section in BOUNDED:
        for key, node in _node(section)["properties"].items():
            if section == "nerf" and key in NERF_WORKFLOW_KEYS:
                continue  # the workflow's own keys: no dataclass behind them
            types = node.get("type")
            types = types if isinstance(types, list) else [types]
            step = 1 if "integer" in types else 1e-3
            if "minimum" in node:
                cases += [(section, key, node["minimum"], True), (section, key, node["minimum"] - step, False)]
            if "exclusiveMinimum" in node:
                cases += [(section, key, node["exclusiveMinimum"], False)]
            if "maximum" in node:
                cases += [(section, key, node["maximum"], True), (section, key, node["maximum"] + step, False)]
            if "exclusiveMaximum" in node:
                cases += [(section, key, node["exclusiveMaximum"], False)]
            if "null" in types:
                cases += [(section, key, None, True)]
    return cases


def test_bounds_are_found():
    """The walk below sees the bounded keys of every section (else the parametrized test could pass on nothing)."""
    sections = {c[0] for c in _bound_cases()}
    assert sections == set(BOUNDED)
    assert ("neuralsim", "temperature", 0, False) in _bound_cases()


@pytest.mark.parametrize("section,key,value,accepted", _bound_cases(), ids=lambda v: str(v))
def test_schema_bounds_are_the_dataclass_bounds(section, key, value, accepted):
    build = BOUNDED[section]
    if accepted:
        build(key, value)
    else:
        with pytest.raises(InputError):
            build(key, value)
