"""Error types that name the file and the field at fault.

Every user-facing failure in instsim derives from :class:`InstsimError`, so scripts can turn it into
one clear line on stderr and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class InstsimError(Exception):
    """Base class: a problem with user input or state that the user can fix."""


class InputError(InstsimError, ValueError):
    """Bad input data.

    Args:
        file: the file (or folder) the problem was found in.
        field: the json field / config key / frame field at fault, e.g. ``frames[3].transform_matrix``.
        message: what is wrong, in words.
    """

    def __init__(self, file: str | Path | None, field: str | None, message: str) -> None:
        self.file = str(file) if file is not None else None
        self.field = field
        self.message = message
        where = []
        if self.file:
            where.append(self.file)
        if field:
            where.append(f"field '{field}'")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


def describe_exception(e: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"`` cut to ``limit`` characters: the gist of a third-party error
    (torch's unpickler, imageio) inside one clear line, without its multi-line advice."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class ConfigError(InputError):
    """A config value that is wrong in a way the JSON schema cannot express."""
