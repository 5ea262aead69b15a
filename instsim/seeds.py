"""Seeds derived from a run seed and a purpose, the same on every machine.

Two derivations, kept apart because outputs on disk depend on each:

* :func:`class_seed`: a seed per (run seed, name, purpose) string triple; the dataset, target and synthetic
  sets of each class are drawn from it.
* :func:`derive_seed` / :func:`generator`: numpy's :class:`~numpy.random.SeedSequence` over integer keys,
  collision-free for any keys (unlike ``seed + 1000 * run``), used by the training loops.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["class_seed", "derive_seed", "generator"]


def class_seed(seed: int, name: str, salt: str = "") -> int:
    """A stable per-class (and per-purpose) seed in ``[0, 2**63 - 1)``."""
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{salt}".encode())) % (2**63 - 1)


def derive_seed(*keys: int, bits: int = 62) -> int:
    """A seed in ``[0, 2**bits)`` from integer ``keys`` (order matters; distinct key tuples do not collide
    in practice: SeedSequence hashes the whole tuple)."""
    state = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return state >> (64 - bits)


def generator(*keys: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded by :func:`derive_seed` of ``keys`` (63-bit)."""
    return torch.Generator().manual_seed(derive_seed(*keys, bits=63))
