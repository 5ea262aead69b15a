"""Construction and training settings of one Instant-NeRF (:class:`NerfConfig`).

Every size of the model comes from here, so a checkpoint stores this whole dict and rebuilds the same
network from it. Units: distances are in NeRF units (the scene cube is ``[-1, 1]^3`` after
:class:`~instsim.nerf.normalization.SceneNormalization`), densities are per NeRF unit length.

Two presets:

* :meth:`NerfConfig.paper` - the Instant-NGP paper's sizes (L=16, F=2, T=2^19, N_min=16, 64-wide MLPs,
  128^3 occupancy grid, 0.95 grid EMA), meant for a GPU;
* :meth:`NerfConfig.cpu` - the benchmarked CPU default (smaller hash table, coarser occupancy grid with a
  fast decay, fewer steps) that reaches the PSNR target in the time budget on two cores.

The dataclass defaults are the paper's where the paper gives a value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from ..backend import BACKENDS, DEVICES
from ..config_fields import FieldChecks
from ..errors import InputError

__all__ = ["NerfConfig", "CONSTRUCTION_KEYS", "PRESETS", "LOSSES", "resolve_max_res"]

#: the named settings (:meth:`NerfConfig.preset`): ``cpu`` the benchmarked 2-core default, ``paper`` Instant-NGP's
PRESETS = ("cpu", "paper")
#: photometric training losses (:attr:`NerfConfig.loss`)
LOSSES = ("l2", "huber")

#: the keys that decide the network's shape and the scene sampling; a checkpoint must agree on these to be
#: resumed or loaded into the same model (the rest only steer training).
CONSTRUCTION_KEYS = (
    "n_levels",
    "n_features",
    "log2_table",
    "base_res",
    "max_res",
    "hidden_dim",
    "geo_feat_dim",
    "density_layers",
    "color_layers",
    "grid_res",
    "march_steps",
)


@dataclass
class NerfConfig:
    """Settings of one NeRF. Defaults are the Instant-NGP paper's (GPU sizes).

    Encoding:
        n_levels: L, levels of the hash grid.
        n_features: F, features per level.
        log2_table: log2 of T, the hash-table size per level.
        base_res: N_min, the coarsest grid resolution (cells per side of the scene cube).
        max_res: N_max, the finest resolution, or ``"auto"``: two cells per pixel footprint at the scene
            centre, from the training camera's focal length and distance (see :func:`resolve_max_res`).
    Network:
        hidden_dim: width of both MLPs.
        geo_feat_dim: geometry feature passed from the density to the colour MLP (the density logit is its
            first entry, as in Instant-NGP).
        density_layers / color_layers: hidden layers of the density / colour MLP.
    Occupancy grid:
        grid_res: cells per side over the scene cube.
        grid_decay: EMA factor on the stored density at each update (``max(decay * old, new)``).
        grid_threshold: a cell is occupied when one march step through it would have opacity above this
            (alpha ``1 - exp(-sigma * dt)``), or its density exceeds the grid's mean, whichever is lower.
        grid_update_every: training steps between grid updates.
        grid_warmup: steps before the first grid update (the grid starts fully occupied).
        grid_sample_fraction: fraction of the unoccupied cells re-evaluated at each update (occupied cells
            are always re-evaluated), so newly grown density is found.
    Marching:
        march_steps: steps along the diagonal of the scene cube: the march step is ``2 sqrt(3) / march_steps``.
        max_samples: most samples per ray (early termination usually stops far sooner).
        min_transmittance: a ray stops once its transmittance drops below this.
    Training:
        steps: total training steps (the learning-rate schedule spans them).
        batch_samples: target network samples per step; the rays per step adapt to it as in Instant-NGP
            (0 = always ``batch_rays`` rays).
        batch_rays: most rays per step.
        lr, lr_final_ratio, lr_warmup: Adam learning rate, decayed exponentially to ``lr * lr_final_ratio``
            at ``steps`` after a linear warm-up of ``lr_warmup`` steps.
        weight_decay: on the MLP weights only. loss: ``"l2"`` or ``"huber"``.
        checkpoint_every, log_every: steps between periodic checkpoints / ``train_log.tsv`` rows.
        seed; device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; mixed_precision: bf16 autocast of the
        MLPs (CUDA only); threads: torch CPU threads (0 = torch's default).
        backend: ``"auto"``, ``"cuda"`` or ``"torch"``: the CUDA kernels or the PyTorch path on a GPU (see
        :mod:`instsim.backend`; the CPU always uses the PyTorch path). Not part of the model: a checkpoint
        trained with one loads into the other.
    """

    # encoding
    n_levels: int = 16
    n_features: int = 2
    log2_table: int = 19
    base_res: int = 16
    max_res: int | str = "auto"
    # network
    hidden_dim: int = 64
    geo_feat_dim: int = 15
    density_layers: int = 1
    color_layers: int = 2
    # occupancy grid
    grid_res: int = 128
    grid_decay: float = 0.95
    grid_threshold: float = 0.01
    grid_update_every: int = 16
    grid_warmup: int = 16
    grid_sample_fraction: float = 0.25
    # marching
    march_steps: int = 1024
    max_samples: int = 1024
    min_transmittance: float = 1e-4
    # training
    steps: int = 20000
    batch_rays: int = 262144
    batch_samples: int = 262144
    lr: float = 1e-2
    lr_final_ratio: float = 0.1
    lr_warmup: int = 0
    weight_decay: float = 1e-6
    loss: str = "l2"
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True
    threads: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, **overrides: Any) -> "NerfConfig":
        """The Instant-NGP paper's sizes (the dataclass defaults), for a GPU."""
        return cls.from_dict(overrides)

    @classmethod
    def cpu(cls, **overrides: Any) -> "NerfConfig":
        """The benchmarked 2-core CPU default for 64-96 px images, 100 views (``benchmarks/bench_nerf_train.py``,
        ``benchmarks/results/nerf_train_cpu.json``): the paper's encoding and MLPs with a 2^15 hash table,
        a 64^3 occupancy grid with a fast decay, 512 march steps across the cube diagonal, 600 steps of
        about 16k samples. On two Xeon cores the three procedural hands reached 33 dB (test, on white) after
        about 20-25 s and 36-39 dB after 43-58 s."""
        base: dict[str, Any] = dict(
            log2_table=15,
            grid_res=64,
            grid_decay=0.6,
            grid_update_every=8,
            grid_warmup=16,
            grid_sample_fraction=0.05,
            march_steps=512,
            steps=600,
            batch_rays=4096,
            batch_samples=16384,
            lr=1e-2,
            lr_final_ratio=0.1,
            checkpoint_every=200,
            log_every=25,
            device="cpu",
        )
        base.update(overrides)
        return cls.from_dict(base)

    @classmethod
    def preset(cls, name: str, overrides: Mapping[str, Any] | None = None, source: str | None = None) -> "NerfConfig":
        """``"cpu"`` or ``"paper"`` with a config file's overrides (unknown keys raise :class:`InputError`
        naming ``source`` and the key)."""
        if name not in PRESETS:
            raise InputError(source, "nerf.preset", f"must be one of {list(PRESETS)}, got {name!r}")
        base = cls.cpu().to_dict() if name == "cpu" else cls().to_dict()
        overrides = FieldChecks("nerf", source).known_keys(overrides or {}, base, "NeRF setting")
        return cls.from_dict({**base, **overrides}, source=source)

    # ------------------------------------------------------------------ dict round trip
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> "NerfConfig":
        """Build from a (config-file) dict. Unknown keys raise :class:`InputError` naming the key; missing
        keys take the defaults. ``source`` names the file for the error message."""
        d = FieldChecks("nerf", source).known_keys(d, (f.name for f in fields(cls)), "NeRF setting")
        try:
            return cls(**d)
        except InputError as e:
            raise InputError(source, e.field, e.message) from None

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    def replace(self, **changes: Any) -> "NerfConfig":
        return replace(self, **changes)

    def construction(self) -> dict[str, Any]:
        """The fields that fix the model's shape (:data:`CONSTRUCTION_KEYS`)."""
        return {k: getattr(self, k) for k in CONSTRUCTION_KEYS}

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`InputError` (field ``nerf.<key>``) on a value that cannot work."""

        def bad(key: str, msg: str) -> None:
            raise InputError(None, f"nerf.{key}", f"{msg}, got {getattr(self, key)!r}")

        def check_int(key: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                bad(key, f"must be an integer in [{lo}, {hi if hi is not None else 'inf'}]")

        def check_float(key: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(key, "must be a finite number")
            if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
                bad(key, f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

        check_int("n_levels", 1, 64)
        check_int("n_features", 1, 16)
        check_int("log2_table", 4, 26)
        check_int("base_res", 2)
        if self.max_res != "auto":
            check_int("max_res", 2)
            if self.max_res < self.base_res:
                bad("max_res", f"must be >= base_res ({self.base_res}) or 'auto'")
        check_int("hidden_dim", 1, 4096)
        check_int("geo_feat_dim", 0, 1024)
        check_int("density_layers", 0, 16)
        check_int("color_layers", 0, 16)
        check_int("grid_res", 2, 1024)
        check_float("grid_decay", 0.0, 1.0)
        check_float("grid_threshold", 0.0, 1.0, lo_open=True, hi_open=True)
        check_int("grid_update_every", 1)
        check_int("grid_warmup", 0)
        check_float("grid_sample_fraction", 0.0, 1.0)
        check_int("march_steps", 2)
        check_int("max_samples", 1)
        check_float("min_transmittance", 0.0, 1.0, hi_open=True)
        check_int("steps", 1)
        check_int("batch_rays", 1)
        check_int("batch_samples", 0)
        check_float("lr", 0.0, 10.0, lo_open=True)
        check_float("lr_final_ratio", 0.0, 1.0, lo_open=True)
        check_int("lr_warmup", 0)
        check_float("weight_decay", 0.0, 1.0)
        if self.loss not in LOSSES:
            bad("loss", f"must be one of {list(LOSSES)}")
        check_int("checkpoint_every", 1)
        check_int("log_every", 1)
        check_int("seed", 0)
        check_int("threads", 0, 1024)
        if not isinstance(self.device, str) or not (
            self.device in DEVICES or self.device.startswith("cuda:")
        ):
            bad("device", f"must be one of {list(DEVICES)} or 'cuda:N'")
        if not isinstance(self.mixed_precision, bool):
            bad("mixed_precision", "must be true or false")
        if self.backend not in BACKENDS:
            bad("backend", f"must be one of {list(BACKENDS)}")

    @property
    def march_dt(self) -> float:
        """The march step in NeRF units: the cube diagonal ``2 sqrt(3)`` over :attr:`march_steps`."""
        return 2.0 * math.sqrt(3.0) / self.march_steps


def resolve_max_res(cfg: NerfConfig, intrinsics_info: Mapping[str, Any]) -> int:
    """N_max in cells per side of the scene cube.

    ``"auto"``: two cells per pixel footprint at the scene centre. A pixel at the nearest camera distance
    ``r`` covers ``r / fl`` world units; the cube's side is ``2 * bound``. Finer cells than that cannot be
    constrained by the images, coarser ones blur them.
    """
    if cfg.max_res != "auto":
        return int(cfg.max_res)
    fl = max(float(intrinsics_info["fl_x"]), float(intrinsics_info["fl_y"]))
    r = float(intrinsics_info["radius"]["min"])
    bound = float(intrinsics_info["scene"]["bound"])
    return max(cfg.base_res, int(math.ceil(2.0 * 2.0 * bound * fl / r)))
