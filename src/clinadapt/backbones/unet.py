"""MONAI's U-Net (``monai.networks.nets.UNet``: Ronneberger et al., MICCAI 2015, with the residual
units of Kerfoot et al., STACOM 2018) as a backbone trained from scratch: the standard segmentation
baseline, in 2D and 3D.

``forward_dense`` is the U-Net's output at the input's resolution with ``features`` channels
(``dense_stride`` 1), on which a segmentation head puts class logits. MONAI's U-Net ends in a
convolution without normalisation or activation, so this map is linear in its last layer; that is
fine because a head follows (a 1x1 head makes the pair one linear layer, as if the U-Net had
``num_classes`` outputs). ``forward`` averages the map into (B, features), so the U-Net also
classifies.

Normalisation is instance norm with affine parameters, as in nnU-Net (Isensee et al., Nature
Methods 2021): segmentation batches are small (2 volumes, a few images), where batch statistics are
noisy, and instance norm behaves the same in training and evaluation and for any batch size.

Every level halves the size, so the U-Net needs sizes divisible by ``2 ** (len(channels) - 1)``,
and instance norm needs more than one cell at the deepest level. Other sizes are zero-padded to
such a multiple, at least twice the factor (half before, half after; zero is the mean after
normalisation) and the map is cropped back, so any input size works.

MONAI is imported when a U-Net is built, so importing ``clinadapt.backbones`` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clinadapt._optional import require
from clinadapt.errors import ConfigError, DataError

__all__ = ["UNet"]

NORM = ("instance", {"affine": True})


class UNet(nn.Module):
    """MONAI's residual U-Net over ``spatial_dims`` 2 (B, C, H, W) or 3 (B, C, D, H, W), with
    ``channels`` per level (stride 2 between levels) and ``features`` output channels.
    ``num_classes`` > 0 adds a linear classifier on the pooled features, as in the other
    clinadapt models."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        features: int = 32,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        num_res_units: int = 2,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2 or min(channels) < 1:
            raise ConfigError(f"channels needs 2 or more positive values, got {list(channels)}")
        if min(in_channels, features) < 1 or num_res_units < 0 or num_classes < 0:
            raise ConfigError(
                f"in_channels and features must be positive and num_res_units and num_classes "
                f"0 or more, got {in_channels}, {features}, {num_res_units}, {num_classes}"
            )
        require("monai", extra=None, needed_by="the U-Net backbone")
        from monai.networks.nets import UNet as MonaiUNet

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_features = features
        self.multiple = 2 ** (len(channels) - 1)
        self.unet = MonaiUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=features,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=num_res_units,
            norm=NORM,
        )
        self.num_classes = num_classes
        self.linear: nn.Module = nn.Linear(features, num_classes) if num_classes else nn.Identity()
        # tells clinadapt's weights loader which state-dict keys are the classifier (timm's field)
        self.pretrained_cfg: dict[str, Any] = {"classifier": "linear"}

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """(B, features, *spatial) at the input's size, padded and cropped as needed."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            want = "(B, C, H, W) images" if self.spatial_dims == 2 else "(B, C, D, H, W) volumes"
            raise DataError(
                f"this {self.spatial_dims}D U-Net takes {want} with C={self.in_channels}, got "
                f"shape {tuple(x.shape)}"
            )
        size, k = x.shape[2:], self.multiple
        missing = [max(2 * k, s + -s % k) - s for s in size]
        if not any(missing):
            return self.unet(x)
        pad = [p for n in reversed(missing) for p in (n // 2, n - n // 2)]  # last axis first
        out = self.unet(F.pad(x, pad))
        crop = tuple(slice(n // 2, n // 2 + s) for n, s in zip(missing, size, strict=True))
        return out[(..., *crop)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_dense(x).flatten(2).mean(-1))
