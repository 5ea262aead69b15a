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

__all__ = ["atomic_path", "atomic_dir", "write_json", "read_json", "write_png", "read_image", "read_image_rgba", "to_uint8", "save_torch", "load_torch"]


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


def write_png(path: str | Path, image: np.ndarray, compress_level: int | None = None) -> None:
    """Write an ``(H, W, C)`` image (uint8, or float in [0, 1]) as PNG, atomically.

    ``compress_level``: zlib level 0-9 (None: Pillow's default, 6). Level 1 writes a large image about 3x
    faster (8000x2400 px: 3.1 s instead of 9.6 s on one core) for a file about 20 % larger; pixels are the same."""
    arr = image if image.dtype == np.uint8 else to_uint8(image)
    extra = {} if compress_level is None else {"compress_level": int(compress_level)}
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, arr, extension=".png", **extra)


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


#: Pillow modes of one channel with more than 8 bits: converting them to RGBA in Pillow clips at 255, so they
#: are read as numbers and scaled by the largest value of their type instead
_WIDE_GREY = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 2.0**31 - 1, "F": 1.0}


def read_image_rgba(path: str | Path, field: str | None = None) -> np.ndarray:
    """Read an image of any size and Pillow mode (RGB, RGBA, grey, grey+alpha, palette, CMYK, 16-bit grey) as
    float32 ``(H, W, 4)`` RGBA in [0, 1]; images without alpha are opaque.

    Pillow converts the mode, so a palette is looked up and a CMYK JPEG's four channels are not taken for
    RGBA (plain :func:`read_image` does not know the mode). A missing or undecodable file raises
    :class:`InputError` naming the file and ``field``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, field, "image file does not exist")
    try:
        mode = iio.immeta(path, plugin="pillow").get("mode")
        if mode in _WIDE_GREY:
            grey = np.clip(iio.imread(path, plugin="pillow").astype(np.float32) / _WIDE_GREY[mode], 0.0, 1.0)
            return np.stack([grey, grey, grey, np.ones_like(grey)], axis=-1)
        arr = iio.imread(path, plugin="pillow", mode="RGBA")
    except Exception as e:  # imageio / Pillow raise many types for corrupt or foreign files
        raise InputError(path, field, f"image cannot be decoded ({describe_exception(e)})") from None
    if arr.ndim != 3 or arr.shape[-1] != 4 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(path, field, f"expected a 2-D image, got array of shape {arr.shape}")
    return arr.astype(np.float32) / 255.0


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
