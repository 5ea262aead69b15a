"""Checks shared by the config dataclasses of the stages (detector, Neural-Sim): a section's keys, and fields
that must be integers or finite numbers in a range. Every failure is a :class:`ConfigError` naming
``<section>.<field>``, so the user sees which key of which section is wrong."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from .errors import ConfigError

__all__ = ["is_int", "is_number", "FieldChecks", "dataclass_from_values"]

T = TypeVar("T")


def is_int(v: Any) -> bool:
    """An int, and not a bool (which Python counts as one; `true` in a YAML file is no step count)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_words(minimum: int) -> str:
    return "a positive integer" if minimum == 1 else f"an integer >= {minimum}"


def dataclass_from_values(cls: type[T], values: Mapping[str, Any], source: str | Path | None = None) -> T:
    """The (frozen) config dataclass ``cls`` with the fields in ``values`` and every other field at its default,
    checked by ``cls.validate(source)``.

    ``__init__`` is bypassed on purpose: its ``__post_init__`` validates without knowing the file, and a config
    error must name the file it came from. ``values`` must hold field names only (see :meth:`FieldChecks.known_keys`)
    already converted to the field's type (e.g. lists to tuples)."""
    cfg = cls.__new__(cls)
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in values:
            value = values[f.name]
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            value = f.default
        object.__setattr__(cfg, f.name, value)
    cfg.validate(source)  # type: ignore[attr-defined]
    return cfg


class FieldChecks:
    """Checks of one config section (``section``, e.g. ``detector``) read from ``source`` (a file, or None)."""

    def __init__(self, section: str, source: str | Path | None = None) -> None:
        self.section = section
        self.source = source

    def fail(self, field: str, message: str) -> NoReturn:
        """Raise the :class:`ConfigError` of ``<section>.<field>``."""
        raise ConfigError(self.source, f"{self.section}.{field}", message)

    def known_keys(self, d: Any, known: Iterable[str], what: str) -> dict[str, Any]:
        """``d`` as a dict, after checking it is a mapping of known keys only (a typo fails, naming the key);
        ``what`` names the keys in the message, e.g. "detector option"."""
        if not isinstance(d, Mapping):
            raise ConfigError(self.source, self.section, f"must be a mapping, got {type(d).__name__}")
        known = set(known)
        for key in d:
            if key not in known:
                self.fail(key, f"unknown {what} (known: {', '.join(sorted(known))})")
        return dict(d)

    def ints(self, obj: Any, names: Iterable[str], minimum: int, optional: bool = False) -> None:
        """Attributes ``names`` of ``obj`` are integers >= ``minimum`` (or None when ``optional``)."""
        for name in names:
            v = getattr(obj, name)
            if optional and v is None:
                continue
            if not is_int(v) or v < minimum:
                self.fail(name, f"must be {'null or ' if optional else ''}{_int_words(minimum)}, got {v!r}")

    def numbers(self, obj: Any, names: Iterable[str], minimum: float = 0, strict: bool = False) -> None:
        """Attributes ``names`` of ``obj`` are finite numbers >= ``minimum`` (> with ``strict``)."""
        for name in names:
            v = getattr(obj, name)
            if not is_number(v) or v < minimum or (strict and v == minimum):
                self.fail(name, f"must be a finite number {'>' if strict else '>='} {minimum:g}, got {v!r}")
