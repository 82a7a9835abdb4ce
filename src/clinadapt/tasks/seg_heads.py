"""Segmentation heads: per-pixel (per-voxel) class logits from a backbone's dense feature map.

A frozen backbone's map is coarse (one cell per 14-32 px for ViTs and ImageNet CNNs), so the head
must bring it back to the input's resolution. ``linear`` is the probe: a 1x1 convolution to class
logits, interpolated up; it measures how much the features alone separate the classes. ``decoder``
learns the upsampling instead, in the spirit of SETR's progressive upsampling decoder (SETR-PUP;
Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with
Transformers", CVPR 2021): one 2x upsampling + 3x3 convolution stage per halving of the stride,
so boundaries are refined step by step rather than smeared by one large interpolation. GroupNorm
keeps the decoder independent of the batch size (a few images or one volume per batch).
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


class SegmentationHead(nn.Module):
    """Logits (B, num_classes, *size) from features (B, in_channels, *grid).

    ``stride`` is the backbone's input pixels per grid cell along each axis (``dense_stride``); its
    length sets 2D or 3D. The decoder has ceil(log2(stride)) stages along each axis; a final
    interpolation reaches exactly ``size``, so strides that are not powers of two and odd sizes
    need no special case.
    """

    def __init__(
        self, in_channels: int, num_classes: int, stride: Sequence[int], kind: str = "decoder"
    ) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ConfigError(
                f"unknown segmentation head {kind!r}; choose one of {list(HEAD_KINDS)}."
                f"{did_you_mean(kind, list(HEAD_KINDS))}"
            )
        stride = tuple(int(s) for s in stride)
        if len(stride) not in (2, 3) or min(stride) < 1:
            raise ConfigError(f"stride must be 2 or 3 positive values, got {stride}")
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(
                f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}"
            )
        self.kind = kind
        self.ndim = len(stride)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.mode = "bilinear" if self.ndim == 2 else "trilinear"
        conv = nn.Conv2d if self.ndim == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        width = in_channels
        if kind == "decoder":
            width = min(in_channels, DECODER_WIDTH)
            layers.append(conv(in_channels, width, 1))
            doublings = [math.ceil(math.log2(s)) for s in stride]
            for stage in range(max(doublings)):
                out = max(width // 2, min(width, MIN_WIDTH))
                scale = tuple(2.0 if stage < d else 1.0 for d in doublings)
                layers += [
                    nn.Upsample(scale_factor=scale, mode=self.mode, align_corners=False),
                    conv(width, out, 3, padding=1, bias=False),
                    nn.GroupNorm(math.gcd(out, NORM_GROUPS), out),
                    nn.ReLU(inplace=True),
                ]
                width = out
        layers.append(conv(width, num_classes, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        size = tuple(int(s) for s in size)
        if features.ndim != self.ndim + 2 or features.shape[1] != self.in_channels:
            grid = "d, h, w" if self.ndim == 3 else "h, w"
            raise DataError(
                f"this {self.ndim}D segmentation head takes features (B, {self.in_channels}, "
                f"{grid}), got shape {tuple(features.shape)}"
            )
        if len(size) != self.ndim:
            raise DataError(f"output size {size} needs {self.ndim} values for this head")
        logits = self.layers(features)
        if tuple(logits.shape[2:]) != size:
            logits = F.interpolate(logits, size=size, mode=self.mode, align_corners=False)
        return logits

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ndim={self.ndim}"
