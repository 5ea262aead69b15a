"""The shared config-section checks (instsim/config_fields.py) and checkpoint reader (instsim.io.load_torch)
that the detector and Neural-Sim configs and checkpoints use."""

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from instsim.config_fields import FieldChecks, dataclass_from_values, is_int, is_number
from instsim.detect import DetectorConfig
from instsim.errors import ConfigError, InputError
from instsim.io import load_torch, save_torch


def test_int_and_number_reject_bools_and_non_finite():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(0.5) and is_number(2) and not is_number(False) and not is_number(float("nan"))
    assert not is_number(float("inf")) and not is_number("1")


@pytest.mark.parametrize(
    "call, value, message",
    [
        (lambda c, o: c.ints(o, ["x"], 1), 0, "must be a positive integer, got 0"),
        (lambda c, o: c.ints(o, ["x"], 1), True, "must be a positive integer, got True"),
        (lambda c, o: c.ints(o, ["x"], 0), -1, "must be an integer >= 0, got -1"),
        (lambda c, o: c.ints(o, ["x"], 1, optional=True), 0, "must be null or a positive integer, got 0"),
        (lambda c, o: c.numbers(o, ["x"]), -0.5, "must be a finite number >= 0, got -0.5"),
        (lambda c, o: c.numbers(o, ["x"], strict=True), 0, "must be a finite number > 0, got 0"),
        (lambda c, o: c.numbers(o, ["x"]), float("nan"), "must be a finite number >= 0, got nan"),
    ],
)
def test_field_checks_name_section_and_field(call, value, message):
    with pytest.raises(ConfigError) as e:
        call(FieldChecks("sec", "cfg.yaml"), SimpleNamespace(x=value))
    assert e.value.field == "sec.x" and e.value.file == "cfg.yaml" and e.value.message == message


@pytest.mark.parametrize(
    "call, value",
    [
        (lambda c, o: c.ints(o, ["x"], 1), 1),
        (lambda c, o: c.ints(o, ["x"], 1, optional=True), None),
        (lambda c, o: c.numbers(o, ["x"]), 0),
        (lambda c, o: c.numbers(o, ["x"], strict=True), 1e-9),
    ],
)
def test_field_checks_accept_values_in_range(call, value):
    call(FieldChecks("sec"), SimpleNamespace(x=value))


def test_known_keys():
    check = FieldChecks("detector")
    assert check.known_keys({"lr": 1}, ["lr", "width"], "detector option") == {"lr": 1}
    with pytest.raises(ConfigError, match=r"unknown detector option \(known: lr, width\)") as e:
        check.known_keys({"lr": 1, "widht": 2}, ["lr", "width"], "detector option")
    assert e.value.field == "detector.widht"
    with pytest.raises(ConfigError, match="must be a mapping, got list"):
        check.known_keys([1], ["lr"], "detector option")


@dataclass(frozen=True)
class _Section:
    steps: int = 3
    names: tuple = field(default_factory=lambda: ("a",))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source=None) -> None:
        FieldChecks("section", source).ints(self, ("steps",), 1)


def test_dataclass_from_values_takes_defaults_and_names_the_file():
    assert dataclass_from_values(_Section, {}) == _Section()
    assert dataclass_from_values(_Section, {"steps": 7}) == _Section(steps=7, names=("a",))
    with pytest.raises(ConfigError, match="section.steps") as e:
        dataclass_from_values(_Section, {"steps": 0}, source="my.yaml")
    assert e.value.file is not None and "my.yaml" in str(e.value)


def test_detector_config_uses_the_shared_checks():
    with pytest.raises(ConfigError, match="detector.epochs.*must be a positive integer, got True"):
        DetectorConfig.from_dict({"epochs": True})
    with pytest.raises(ConfigError, match="detector.nms_iou.*finite number >= 0"):
        DetectorConfig.from_dict({"nms_iou": float("inf")})


def test_load_torch_checks_the_format(tmp_path):
    save_torch({"format": "fmt-v1", "x": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_torch(tmp_path / "ok.pt", "fmt-v1", "a test file")["x"], torch.ones(2))
    with pytest.raises(InputError, match=r"not a test file \(expected format 'fmt-v2'\); delete it") as e:
        load_torch(tmp_path / "ok.pt", "fmt-v2", "a test file", hint="; delete it")
    assert e.value.field == "format"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read a test file: ") as e:
        load_torch(tmp_path / "junk.pt", "fmt-v1", "a test file")
    assert e.value.file == str(tmp_path / "junk.pt")
