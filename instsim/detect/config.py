"""The detector's configuration: one frozen dataclass, saved inside every checkpoint.

Units: ``image_size`` and ``stride`` are pixels; ``lr`` is the AdamW peak learning rate; ``epochs`` and
``steps`` count passes over the training set and optimizer steps. Everything that changes the trained
weights is here, so a checkpoint's config tells how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..config_fields import FieldChecks, dataclass_from_values
from ..errors import ConfigError

__all__ = ["DetectorConfig"]


@dataclass(frozen=True)
class DetectorConfig:
    """Hyper-parameters of the centre-heatmap detector, its training and its decoding.

    Model:
        image_size: training image side in pixels (square images ``image_size x image_size``). The network
            is fully convolutional, so any ``H, W`` divisible by ``stride`` also works at inference.
        num_classes: number of object classes ``C``; labels are 0-based ``0..C-1``.
        width: channels at stride 2; stages at stride >= 4 use ``2 * width``.
        head_width: channels of the hidden 3x3 conv of each head.
        stride: output stride in pixels (a power of two, 2..8); the heads are ``(H/stride, W/stride)``.
        dilations: dilation of each residual block at the output stride (widens the receptive field
            without further downsampling); the default covers a 64x64 image from every output cell.

    Training:
        lr: peak AdamW learning rate (linear warm-up over ``warmup_steps``, then cosine to ``lr * min_lr_ratio``).
        weight_decay: AdamW decoupled weight decay.
        batch_size: images per step.
        epochs: passes over the training set; ignored when ``steps`` is set.
        steps: total optimizer steps (overrides ``epochs``).
        grad_clip: max global gradient norm (0 disables clipping).
        seed: seeds the weight initialisation, the per-epoch shuffles and the augmentation.
        checkpoint_every: steps between checkpoints (when a checkpoint path is given).
        aug_shift: max random translation in pixels (boxes follow; 0 disables). No flips: a flip changes a
            hand's chirality.
        aug_color: strength of the colour jitter (per-channel gain / brightness / contrast; 0 disables).
        aug_noise: std of additive Gaussian pixel noise in [0,1] units (0 disables).

    Loss:
        focal_alpha, focal_beta: exponents of the penalty-reduced focal loss (CenterNet: 2 and 4).
        size_weight, offset_weight: weights of the L1 log-size and centre-offset losses.
        min_overlap: CenterNet Gaussian radius rule parameter.

    Decoding:
        score_threshold: minimum heatmap score of a detection.
        max_detections: top-k peaks kept per image.
        nms_iou: class-wise NMS IoU threshold applied after peak extraction (>= 1 disables NMS).
    """

    image_size: int = 64
    num_classes: int = 3
    width: int = 24
    head_width: int = 32
    stride: int = 4
    dilations: tuple[int, ...] = (1, 2, 4)
    lr: float = 6e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    epochs: int = 15
    steps: int | None = None
    warmup_steps: int = 30
    min_lr_ratio: float = 0.02
    grad_clip: float = 10.0
    seed: int = 0
    checkpoint_every: int = 50
    aug_shift: int = 4
    aug_color: float = 0.15
    aug_noise: float = 0.02
    focal_alpha: float = 2.0
    focal_beta: float = 4.0
    size_weight: float = 1.0
    offset_weight: float = 1.0
    min_overlap: float = 0.7
    score_threshold: float = 0.05
    max_detections: int = 20
    nms_iou: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        self.validate()

    def validate(self, source: str | Path | None = None) -> None:
        """Raise :class:`ConfigError` naming the field for any impossible value."""

        check = FieldChecks("detector", source)
        bad = check.fail
        check.ints(self, ("image_size", "num_classes", "width", "head_width", "batch_size", "max_detections",
                          "checkpoint_every"), 1)
        if self.stride not in (2, 4, 8):
            bad("stride", f"must be 2, 4 or 8 pixels, got {self.stride!r}")
        if self.image_size % self.stride:
            bad("image_size", f"must be divisible by the stride {self.stride}, got {self.image_size}")
        if not self.dilations or any(d < 1 for d in self.dilations):
            bad("dilations", f"must be a non-empty list of positive integers, got {list(self.dilations)}")
        check.ints(self, ("steps",), 1, optional=True)
        check.ints(self, ("epochs",), 1)
        check.ints(self, ("warmup_steps", "aug_shift", "seed"), 0)
        check.numbers(self, ("lr", "weight_decay", "min_lr_ratio", "grad_clip", "aug_color", "aug_noise",
                             "focal_alpha", "focal_beta", "size_weight", "offset_weight", "score_threshold",
                             "nms_iou"), 0)
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not 0 < self.min_overlap < 1:
            bad("min_overlap", f"must be in (0, 1), got {self.min_overlap}")
        if self.score_threshold >= 1:
            bad("score_threshold", f"must be in [0, 1), got {self.score_threshold}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``dilations`` as a list)."""
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | Path | None = None) -> "DetectorConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` (catches typos), missing keys
        take their defaults."""
        kwargs = FieldChecks("detector", source).known_keys(d, (f.name for f in fields(cls)), "detector option")
        if "dilations" in kwargs:
            dil = kwargs["dilations"]
            if not isinstance(dil, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in dil):
                raise ConfigError(source, "detector.dilations", f"must be a list of positive integers, got {dil!r}")
            kwargs["dilations"] = tuple(int(x) for x in dil)
        return dataclass_from_values(cls, kwargs, source)

    def total_steps(self, num_images: int) -> int:
        """Optimizer steps of a full training run on ``num_images`` images (``steps`` or ``epochs`` epochs)."""
        if self.steps is not None:
            return self.steps
        return self.epochs * steps_per_epoch(num_images, self.batch_size)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped; a set smaller than a batch is one step)."""
    return max(1, num_images // batch_size)
