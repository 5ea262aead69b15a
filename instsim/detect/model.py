"""A small anchor-free centre-heatmap detector (CenterNet-style) that trains from scratch on a CPU.

Input: images ``(B, 3, H, W)`` float in ``[0, 1]`` (``H, W`` divisible by the stride). Output at stride
``s``, ``(h, w) = (H/s, W/s)``:

* ``heatmap``: ``(B, C, h, w)`` **logits** of the per-class centre heatmaps (sigmoid gives scores).
* ``size``: ``(B, 2, h, w)`` log of the box (width, height) in output cells: ``box_w = s * exp(size[0])``.
* ``offset``: ``(B, 2, h, w)`` sub-cell centre offset (x, y) in cells, ideally in ``[0, 1)``:
  ``centre_x = s * (col + offset[0])`` pixels (pixel convention of :mod:`instsim.cameras`: the top-left
  pixel covers ``[0, 1) x [0, 1)`` and its centre is ``(0.5, 0.5)``).

Every layer is per-image (GroupNorm, no BatchNorm), smooth (SiLU) and twice differentiable, so
per-image gradients and d/d(image) of parameter gradients are well defined.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .config import DetectorConfig

__all__ = ["DetectorOutput", "CenterNet", "build_detector"]

# fixed input normalisation: [0,1] images -> roughly zero mean, unit std
_MEAN = 0.5
_STD = 0.25
# sigmoid(-2.19) ~= 0.1: the CenterNet heatmap prior, keeps the focal loss sane at step 0
HEATMAP_BIAS_INIT = -2.19


class DetectorOutput(NamedTuple):
    """Raw head outputs; see the module docstring for shapes and units."""

    heatmap: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ConvBlock(nn.Sequential):
    """3x3 conv -> GroupNorm -> SiLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            nn.GroupNorm(_groups(cout), cout),
            nn.SiLU(),
        )


class ResBlock(nn.Module):
    """``x + ConvBlock(x)`` at constant resolution (dilated 3x3 conv)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.block = ConvBlock(channels, channels, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Head(nn.Sequential):
    """3x3 conv -> SiLU -> 1x1 conv to ``cout`` channels."""

    def __init__(self, cin: int, hidden: int, cout: int, bias_init: float = 0.0) -> None:
        super().__init__(nn.Conv2d(cin, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, cout, 1))
        nn.init.constant_(self[2].bias, bias_init)


class CenterNet(nn.Module):
    """Backbone (stride-2 stem, strided conv blocks down to ``cfg.stride``, dilated residual blocks) and
    three heads (heatmap, log-size, offset). Build it with :func:`build_detector` for seeded weights."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = [ConvBlock(3, w, stride=2), ConvBlock(w, w)]
        c, s = w, 2
        while s < cfg.stride:
            layers.append(ConvBlock(c, 2 * w, stride=2))
            c, s = 2 * w, s * 2
        layers += [ResBlock(c, d) for d in cfg.dilations]
        self.backbone = nn.Sequential(*layers)
        self.heatmap_head = Head(c, cfg.head_width, cfg.num_classes, bias_init=HEATMAP_BIAS_INIT)
        self.size_head = Head(c, cfg.head_width, 2)
        self.offset_head = Head(c, cfg.head_width, 2, bias_init=0.0)
        # start the log-size at a typical object (a quarter of the image) instead of one cell
        nn.init.constant_(self.size_head[2].bias, math.log(max(cfg.image_size / 4 / cfg.stride, 1.0)))
        # offsets start at the cell centre
        nn.init.constant_(self.offset_head[2].bias, 0.5)

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def forward(self, images: torch.Tensor) -> DetectorOutput:
        """``images (B, 3, H, W)`` in ``[0, 1]`` -> :class:`DetectorOutput` at stride ``cfg.stride``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % self.stride or images.shape[3] % self.stride:
            raise ValueError(f"image size {tuple(images.shape[2:])} must be divisible by the stride {self.stride}")
        f = self.backbone((images - _MEAN) / _STD)
        return DetectorOutput(self.heatmap_head(f), self.size_head(f), self.offset_head(f))


def build_detector(cfg: DetectorConfig | None = None) -> CenterNet:
    """A freshly initialised detector; the weights depend only on ``cfg`` (``cfg.seed``), not on the
    global RNG state (which is left untouched)."""
    cfg = cfg or DetectorConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = CenterNet(cfg)
    return model
