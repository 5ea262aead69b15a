"""NeRF checkpoints: everything needed to rebuild, check, use and resume a model, in one ``torch.save`` file.

Contents (a dict of plain types and tensors, so it loads with ``weights_only=True``, i.e. without
unpickling arbitrary objects):

* ``format_version`` (:data:`FORMAT_VERSION`), ``kind`` ("instsim.nerf"), ``step`` (training steps done);
* ``config``: the full :class:`~instsim.nerf.config.NerfConfig` dict with ``max_res`` resolved;
* ``normalization``: ``centre``, ``scale``, ``bound`` (:class:`~instsim.nerf.normalization.SceneNormalization`);
* ``intrinsics``: the training camera (:class:`~instsim.cameras.Intrinsics` dict);
* ``model``: the state dict, occupancy grid included; ``optimizer`` and ``rng`` (for resuming; may be None);
* ``train``: small training facts (elapsed seconds, rays per batch, ...).

Files are written atomically, so a killed process leaves the previous checkpoint intact.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from ..cameras import Intrinsics
from ..errors import InstsimError
from ..io import atomic_path
from .network import InstantNerf

__all__ = [
    "FORMAT_VERSION",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
    "compare_fields",
    "expect_from_intrinsics",
    "flatten_meta",
    "checkpoint_meta",
]

FORMAT_VERSION = 1
KIND = "instsim.nerf"
_REQUIRED = ("format_version", "step", "config", "normalization", "intrinsics", "model")


def save_checkpoint(
    path: str | Path,
    model: InstantNerf,
    *,
    step: int,
    intrinsics: Intrinsics,
    optimizer: torch.optim.Optimizer | None = None,
    rng: Mapping[str, Any] | None = None,
    train: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` (with its config, normalization and occupancy grid) and training state atomically."""
    state = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "step": int(step),
        "config": model.cfg.to_dict(),
        "normalization": model.normalization.to_dict(),
        "intrinsics": intrinsics.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "rng": dict(rng) if rng is not None else None,
        "train": dict(train or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked for completeness and format version.

    Raises :class:`InstsimError` naming the file for a missing, truncated or corrupt file, another kind of
    file, or an unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise InstsimError(f"{path}: NeRF checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncation surfaces as RuntimeError, EOFError, UnpicklingError, ...
        raise InstsimError(
            f"{path}: NeRF checkpoint is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "delete it and train again"
        ) from None
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise InstsimError(f"{path}: not an instsim NeRF checkpoint")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise InstsimError(
            f"{path}: NeRF checkpoint format version {version!r}; this instsim reads version {FORMAT_VERSION}. "
            "Retrain the NeRF (or use the instsim version that wrote it)"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise InstsimError(f"{path}: NeRF checkpoint lacks {', '.join(missing)}; it is incomplete")
    return state


def flatten_meta(meta: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (``{"config": {"n_levels": 16}}`` -> ``{"config.n_levels": 16}``)."""
    flat: dict[str, Any] = {}
    for k, v in meta.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_meta(v, key + "."))
        else:
            flat[key] = v
    return flat


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


def _equal(a: Any, b: Any, rel_tol: float, abs_tol: float) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)) or len(a) != len(b):
            return False
        return all(_equal(x, y, rel_tol, abs_tol) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)
    return a == b


def compare_fields(
    meta: Mapping[str, Any], expect: Mapping[str, Any], rel_tol: float = 1e-6, abs_tol: float = 1e-9
) -> list[str]:
    """Lines ``"field: checkpoint A, expected B"`` for every expected field that differs (empty if all agree).

    ``expect`` keys may be dotted (``config.log2_table``), nested dicts, or bare names that are looked up in
    this order: top level, ``normalization.``, ``config.``, ``intrinsics.`` (so ``bound`` means
    ``normalization.bound``). Numbers compare with a relative tolerance of ``rel_tol``.
    """
    have = flatten_meta(meta)
    diffs = []
    for key, want in flatten_meta(expect).items():
        found = None
        for cand in (key, f"normalization.{key}", f"config.{key}", f"intrinsics.{key}"):
            if cand in have:
                found = cand
                break
        if found is None:
            diffs.append(f"{key}: not in the checkpoint, expected {_fmt(want)}")
        elif not _equal(have[found], want, rel_tol, abs_tol):
            diffs.append(f"{key}: checkpoint {_fmt(have[found])}, expected {_fmt(want)}")
    return diffs


def expect_from_intrinsics(info: Mapping[str, Any]) -> dict[str, Any]:
    """The ``expect`` dict that ties a checkpoint to an ``extract_intrinsics`` result: scene centre and bound
    and the camera (w, h, focal lengths, principal point)."""
    return {
        "normalization.centre": [float(c) for c in info["centre"]],
        "normalization.bound": float(info["scene"]["bound"]),
        **{f"intrinsics.{k}": info[k] for k in ("w", "h", "fl_x", "fl_y", "cx", "cy")},
    }


def checkpoint_meta(state: Mapping[str, Any]) -> dict[str, Any]:
    """The descriptive part of a raw checkpoint (no weights, optimizer or RNG state)."""
    meta = {k: state[k] for k in ("format_version", "step", "config", "normalization", "intrinsics")}
    meta["train"] = dict(state.get("train") or {})
    return meta


def load_checkpoint(
    path: str | Path, expect: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
) -> tuple[InstantNerf, dict[str, Any]]:
    """Build the model stored in ``path`` and return ``(model, meta)``.

    Args:
        path: a file written by :func:`save_checkpoint`.
        expect: fields the checkpoint must have (see :func:`compare_fields`; e.g.
            :func:`expect_from_intrinsics`). Any difference raises :class:`InstsimError` listing every
            differing field as ``bound: checkpoint 1.27, expected 2.0``.
        device: where the model goes.

    ``meta`` holds ``format_version``, ``step``, ``config``, ``normalization``, ``intrinsics``
    (:class:`Intrinsics` dict) and ``train``. The model is in eval mode and its weights are frozen
    (``requires_grad`` off): a render with ``requires_grad=True`` then differentiates to the camera poses only,
    without computing the hash table's and MLPs' gradients nobody reads (``requires_grad_(True)`` to fine-tune).
    """
    state = read_checkpoint(path)
    meta = checkpoint_meta(state)
    if expect:
        diffs = compare_fields(meta, expect)
        if diffs:
            raise InstsimError(
                f"{path}: NeRF checkpoint does not match what this run expects:\n  " + "\n  ".join(diffs)
            )
    try:
        model = InstantNerf.build(state["config"], state["normalization"])
        model.load_state_dict(state["model"])
    except InstsimError:
        raise
    except Exception as e:
        raise InstsimError(f"{path}: NeRF checkpoint cannot be loaded into a model ({type(e).__name__}: {e})") from None
    model.to(device)
    model.occupancy.refresh()
    model.eval()
    model.requires_grad_(False)
    return model, meta
