"""Segmentation heads: per-pixel (per-voxel) class logits from a backbone's feature maps.

A frozen backbone's last map is coarse (one cell per 14-32 px for ViTs and ImageNet CNNs), so the
head must bring it back to the input's resolution. ``linear`` is the probe: a 1x1 convolution to
class logits on the last map, interpolated up; it measures how much the features alone separate
the classes. ``decoder`` learns the upsampling instead, in the spirit of SETR's progressive
upsampling decoder (SETR-PUP; Zheng et al., "Rethinking Semantic Segmentation from a
Sequence-to-Sequence Perspective with Transformers", CVPR 2021): one 2x upsampling + 3x3
convolution stage per halving of the stride, so boundaries are refined step by step rather than
smeared by one large interpolation. Where the backbone offers finer maps (a CNN's earlier stages,
``Backbone.dense_levels``), the stage that reaches a map's stride concatenates it, projected, as
a skip connection (U-Net: Ronneberger et al., MICCAI 2015; FPN: Lin et al., CVPR 2017): a
32-pixel cell cannot place a 10-pixel nucleus, the stride-2 to -16 maps can. GroupNorm keeps the
decoder independent of the batch size (a few images or one volume per batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clinadapt.errors import ConfigError, DataError
from clinadapt.registry import did_you_mean

__all__ = ["HEAD_KINDS", "SegmentationHead"]

HEAD_KINDS = ("linear", "decoder")
DECODER_WIDTH = 128
"""Channels after the decoder's first 1x1 reduction (fewer if the features have fewer)."""
MIN_WIDTH = 16
"""The decoder halves its channels at each stage down to this floor."""
NORM_GROUPS = 8
"""GroupNorm groups: the largest divisor of the channels up to this."""
SKIP_TOLERANCE = 0.5
"""A finer map joins the stage whose stride is within this many octaves (log2) on every axis."""


class SegmentationHead(nn.Module):
    """Logits (B, num_classes, *size) from feature maps [(B, in_channels[i], *grid_i)], fine to
    coarse.

    ``strides`` are the maps' input pixels per grid cell along each axis (``dense_level_strides``);
    their length sets 2D or 3D. The decoder starts from the coarsest map and has
    ceil(log2(stride)) stages along each axis; a finer map joins the first stage that reaches
    about its stride (maps no stage reaches are unused), resized to it if odd sizes make the grids
    differ by a cell. A final interpolation reaches exactly ``size``, so strides that are not
    powers of two and odd sizes need no special case. With one map the module is the decoder
    without skips, layer for layer.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        strides: Sequence[Sequence[int]],
        kind: str = "decoder",
    ) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ConfigError(
                f"unknown segmentation head {kind!r}; choose one of {list(HEAD_KINDS)}."
                f"{did_you_mean(kind, list(HEAD_KINDS))}"
            )
        in_channels = tuple(int(c) for c in in_channels)
        strides = tuple(tuple(int(s) for s in level) for level in strides)
        if not strides or len(strides) != len(in_channels):
            raise ConfigError(
                f"one stride per feature map is needed: {len(in_channels)} maps, "
                f"{len(strides)} strides"
            )
        for stride in strides:
            if len(stride) not in (2, 3) or min(stride) < 1 or len(stride) != len(strides[-1]):
                raise ConfigError(
                    f"stride must be 2 or 3 positive values, the same number for every map, "
                    f"got {list(strides)}"
                )
        if min(in_channels) < 1 or num_classes < 1:
            raise ConfigError(
                f"in_channels and num_classes must be positive, got {list(in_channels)}, "
                f"{num_classes}"
            )
        self.kind = kind
        self.ndim = len(strides[-1])
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.mode = "bilinear" if self.ndim == 2 else "trilinear"
        conv = nn.Conv2d if self.ndim == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        skips = nn.ModuleDict()
        self.skip_levels: dict[int, int] = {}  # stage -> index of the map it concatenates
        width = in_channels[-1]
        self.stages = 0
        if kind == "decoder":
            width = min(in_channels[-1], DECODER_WIDTH)
            layers.append(conv(in_channels[-1], width, 1))
            doublings = [math.ceil(math.log2(s)) for s in strides[-1]]
            self.stages = max(doublings)
            for stage in range(self.stages):
                out = max(width // 2, min(width, MIN_WIDTH))
                scale = tuple(2.0 if stage < d else 1.0 for d in doublings)
                layers.append(nn.Upsample(scale_factor=scale, mode=self.mode, align_corners=False))
                reached = tuple(
                    s / 2 ** min(stage + 1, d) for s, d in zip(strides[-1], doublings, strict=True)
                )
                level = _closest_level(strides[:-1], reached)
                joined = 0
                if level is not None:
                    joined = min(in_channels[level], out)
                    self.skip_levels[stage] = level
                    skips[str(stage)] = nn.Sequential(
                        conv(in_channels[level], joined, 1, bias=False),
                        nn.GroupNorm(math.gcd(joined, NORM_GROUPS), joined),
                        nn.ReLU(inplace=True),
                    )
                layers += [
                    conv(width + joined, out, 3, padding=1, bias=False),
                    nn.GroupNorm(math.gcd(out, NORM_GROUPS), out),
                    nn.ReLU(inplace=True),
                ]
                width = out
        layers.append(conv(width, num_classes, 1))
        self.layers = nn.Sequential(*layers)
        self.skips = skips

    def forward(self, levels: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        size = tuple(int(s) for s in size)
        if len(levels) != len(self.in_channels):
            raise DataError(
                f"this segmentation head takes {len(self.in_channels)} feature maps (fine to "
                f"coarse), got {len(levels)}"
            )
        grid = "d, h, w" if self.ndim == 3 else "h, w"
        for i, (features, channels) in enumerate(zip(levels, self.in_channels, strict=True)):
            if features.ndim != self.ndim + 2 or features.shape[1] != channels:
                where = f" as map {i} (fine to coarse)" if len(levels) > 1 else ""
                raise DataError(
                    f"this {self.ndim}D segmentation head takes features (B, {channels}, {grid})"
                    f"{where}, got shape {tuple(features.shape)}"
                )
        if len(size) != self.ndim:
            raise DataError(f"output size {size} needs {self.ndim} values for this head")
        x = levels[-1]
        if self.kind == "decoder":
            x = self.layers[0](x)
            for stage in range(self.stages):
                upsample, conv, norm, act = self.layers[1 + 4 * stage : 5 + 4 * stage]
                x = upsample(x)
                if stage in self.skip_levels:
                    skip = self.skips[str(stage)](levels[self.skip_levels[stage]])
                    if x.shape[2:] != skip.shape[2:]:
                        x = F.interpolate(
                            x, size=skip.shape[2:], mode=self.mode, align_corners=False
                        )
                    x = torch.cat([x, skip], dim=1)
                x = act(norm(conv(x)))
        logits = self.layers[-1](x)
        if tuple(logits.shape[2:]) != size:
            logits = F.interpolate(logits, size=size, mode=self.mode, align_corners=False)
        return logits

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ndim={self.ndim}, skips={self.skip_levels}"


def _closest_level(strides: Sequence[tuple[int, ...]], reached: tuple[float, ...]) -> int | None:
    """The map whose stride is within ``SKIP_TOLERANCE`` octaves of ``reached`` on every axis,
    the closest (the deeper on a tie); None if none is. The interval is half-open so that a map
    joins one stage only."""
    best, best_gap = None, math.inf
    for i, stride in enumerate(strides):
        gaps = [math.log2(s / r) for s, r in zip(stride, reached, strict=True)]
        if all(-SKIP_TOLERANCE <= g < SKIP_TOLERANCE for g in gaps):
            gap = sum(abs(g) for g in gaps)
            if gap <= best_gap:
                best, best_gap = i, gap
    return best
