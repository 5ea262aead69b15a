"""Atomic file output and image input/output.

Every file a stage produces is written under a temporary name in the same folder and renamed into
place, so a killed stage never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import imageio.v3 as iio
import numpy as np

from .errors import InputError, describe_exception

__all__ = ["atomic_path", "atomic_dir", "write_json", "read_json", "write_png", "read_image", "to_uint8", "save_torch", "load_torch"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit rename it onto ``path``, on error delete it.

    The temporary name keeps the suffix, so libraries that infer the format from it still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` (old contents go)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(o: Any) -> Any:
    """numpy and torch scalars/arrays as plain JSON values."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray) or hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically. NaN/inf are refused (they are not JSON)."""
    text = json.dumps(obj, indent=2, allow_nan=False, default=_json_default)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def read_json(path: str | Path, what: str = "json file") -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`InputError` naming it and the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, None, f"{what} does not exist") from None
    except OSError as e:
        raise InputError(path, None, f"cannot read {what}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, None, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, rounded."""
    return (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an ``(H, W, C)`` image (uint8, or float in [0, 1]) as PNG, atomically."""
    arr = image if image.dtype == np.uint8 else to_uint8(image)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, arr, extension=".png")


def read_image(path: str | Path, field: str | None = None) -> np.ndarray:
    """Read an image as float32 ``(H, W, C)`` in [0, 1], C in {3, 4} (grey becomes RGB).

    A missing, truncated or undecodable file raises :class:`InputError` naming the file and ``field``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, field, "image file does not exist")
    try:
        arr = iio.imread(path)
    except Exception as e:  # imageio raises many types for corrupt files
        raise InputError(path, field, f"image cannot be decoded ({type(e).__name__}: {e})") from None
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputError(path, field, f"expected an RGB or RGBA image, got array of shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (checkpoints: a kill mid-write leaves the previous file intact)."""
    import torch  # imported here: the json/png helpers serve stages that never load torch (summarize; ~1 s saved)

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, fmt: str, what: str, hint: str = "") -> dict:
    """A dict written by :func:`save_torch` whose ``"format"`` entry is ``fmt``, loaded on the CPU.

    A file that cannot be read (corrupt, truncated, not torch) or holds something else raises
    :class:`InputError` naming the file; ``what`` says what was expected ("a detector checkpoint") and
    ``hint`` is added to the message (e.g. "; delete it to start over")."""
    import torch  # imported here: see save_torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (corrupt / truncated / foreign file)
        # the file is there but torch cannot unpickle it: a write that never finished or another kind of file
        raise InputError(path, None, f"cannot read {what}: truncated or corrupt ({describe_exception(e)}){hint}") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        raise InputError(path, "format", f"not {what} (expected format {fmt!r}){hint}")
    return ck
