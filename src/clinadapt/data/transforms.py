"""Bring a batch of medical images to what a backbone expects: 3 channels, its input size, its
normalisation. How small images reach the input size is part of the result (MedMNIST v2
upsampled with nearest neighbour, MedMNIST+ zero-padded), so it is explicit and recorded.
``VolumePreprocess`` does the same for volume-native (3D) backbones."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clinadapt.data.checks import check_pixels
from clinadapt.errors import ConfigError, DataError
from clinadapt.registry import did_you_mean

__all__ = [
    "PAIR_RESIZE_MODES",
    "RESIZE_MODES",
    "VOLUME_RESIZE_MODES",
    "PairPreprocess",
    "PairResize",
    "Preprocess",
    "VolumePreprocess",
    "check_pixels",
]

RESIZE_MODES = ("nearest", "bilinear", "pad")
VOLUME_RESIZE_MODES = ("nearest", "trilinear", "pad")
PAIR_RESIZE_MODES = ("linear", "nearest", "pad")


def check_options(pre: Any, modes: tuple[str, ...], what: str) -> None:
    """Validate a preprocessing dataclass; mean/std become per-channel tuples (one value is
    broadcast), so the frozen object stays hashable."""
    if pre.resize not in modes:
        raise ConfigError(
            f"resize={pre.resize!r} is not one of {list(modes)}{what}."
            f"{did_you_mean(str(pre.resize), list(modes))}"
        )
    if pre.channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {pre.channels}")
    if pre.input_size < 1:
        raise ConfigError(f"input_size must be positive, got {pre.input_size}")
    for key in ("mean", "std"):
        try:
            values = tuple(float(v) for v in np.atleast_1d(np.asarray(getattr(pre, key))))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{key} must be a number or numbers, got {getattr(pre, key)!r}"
            ) from None
        if len(values) == 1:
            values = values * pre.channels
        if len(values) != pre.channels:
            raise ConfigError(
                f"{key} needs 1 or {pre.channels} values for channels={pre.channels}, got "
                f"{list(values)}"
            )
        object.__setattr__(pre, key, values)
    if min(pre.std) <= 0:
        raise ConfigError(f"std values must be positive, got {list(pre.std)}")


@dataclass(frozen=True)
class Preprocess:
    """``Preprocess(224, mean, std, "pad")(batch)`` -> float32 tensor (B, channels, S, S).

    ``batch`` is (B, H, W) or (B, H, W, C) with C in {1, 3}, uint8 in [0, 255] or float in
    [0, 1], as a numpy array or a tensor (kept on its device). Grayscale is repeated to 3
    channels; colour given to a 1-channel backbone (``channels=1``) is averaged. Resize modes:
    ``nearest`` (MedMNIST v2: nearest-exact upsampling), ``bilinear`` (antialiased when
    shrinking), ``pad`` (MedMNIST+: centred in an S x S canvas of zeros, zero being black in
    pixel space, i.e. before normalisation).
    """

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "nearest"
    channels: int = 3

    def __post_init__(self) -> None:
        check_options(self, RESIZE_MODES, "")

    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = batch if isinstance(batch, torch.Tensor) else torch.tensor(np.asarray(batch))
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point():
            x = x.float()
            if not torch.isfinite(x).all():
                raise DataError("images given to Preprocess contain NaN or infinite pixels")
        else:
            raise DataError(f"images must be uint8 in [0, 255] or float in [0, 1], got {x.dtype}")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        else:
            raise DataError(
                f"Preprocess expects a batch (B, H, W) or (B, H, W, C) with C 1 or 3, got shape "
                f"{tuple(x.shape)} (3D volumes are embedded slice by slice by the engine)"
            )
        if x.shape[1] != self.channels:
            x = x.mean(dim=1, keepdim=True) if self.channels == 1 else x.expand(-1, 3, -1, -1)
        x = self._resize(x)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        mode = "linear" if self.resize == "bilinear" else self.resize
        return resize(x, (self.input_size,) * 2, mode, "images", RESIZE_MODES)

    def describe(self) -> dict[str, Any]:
        """What a run record needs to say how images reached the backbone."""
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
        }


@dataclass(frozen=True)
class VolumePreprocess:
    """``VolumePreprocess(28, 0.0, 1.0)(volumes)`` -> float32 tensor (B, channels, S, S, S).

    ``volumes`` is (B, D, H, W), uint8 in [0, 255] or float in [0, 1], as a numpy array or a
    tensor (kept on its device). The single channel is repeated to ``channels`` (3 is MedMNIST's
    ``as_rgb``). ``mean``/``std`` are one value or one per channel. Resize modes: ``nearest``
    (nearest-exact; integer upsampling repeats voxels), ``trilinear`` (no antialiasing, so avoid
    it for shrinking), ``pad`` (centred in an S^3 cube of zeros, zero in voxel space, i.e. before
    normalisation). Every axis is resized to S, so the result is a cube.
    """

    input_size: int
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    resize: str = "nearest"
    channels: int = 1

    def __post_init__(self) -> None:
        check_options(self, VOLUME_RESIZE_MODES, " for volumes")

    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        where = "volumes given to VolumePreprocess"
        if isinstance(batch, torch.Tensor):
            x = batch
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise DataError(f"{where} contain NaN or infinite voxels")
        else:
            array = np.asarray(batch)
            check_pixels(array, where)
            x = torch.from_numpy(np.ascontiguousarray(array))
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point():
            x = x.float()
        else:
            raise DataError(f"volumes must be uint8 in [0, 255] or float in [0, 1], got {x.dtype}")
        if x.ndim != 4:
            raise DataError(
                f"VolumePreprocess expects a batch of volumes (B, D, H, W), got shape "
                f"{tuple(x.shape)}"
            )
        x = self._resize(x[:, None])
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
        return ((x - mean) / std).contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        mode = "linear" if self.resize == "trilinear" else self.resize
        return resize(x, (self.input_size,) * 3, mode, "volumes", VOLUME_RESIZE_MODES)

    def describe(self) -> dict[str, Any]:
        """What a run record needs to say how volumes reached the backbone."""
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
            "ndim": 3,
        }


def resize(
    x: torch.Tensor, target: tuple[int, ...], mode: str, what: str, modes: tuple[str, ...]
) -> torch.Tensor:
    """``x`` (B, C, *spatial) at ``target``, one way for 2D and 3D: ``nearest`` (nearest-exact),
    ``linear`` (bilinear or trilinear, antialiased when a 2D image shrinks) or ``pad`` (centred
    on a canvas of zeros). When inputs do not fit the canvas, the error names them as ``what``
    and suggests the caller's other ``modes``."""
    shape = tuple(x.shape[2:])
    if shape == target:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=target, mode="nearest-exact")
    shrink = any(n > t for n, t in zip(shape, target, strict=True))
    if mode == "linear":
        linear = "bilinear" if len(target) == 2 else "trilinear"
        antialias = shrink and len(target) == 2
        return F.interpolate(x, size=target, mode=linear, align_corners=False, antialias=antialias)
    if shrink:
        others = " or ".join(f"resize={m!r}" for m in modes if m != "pad")
        raise ConfigError(
            f"resize='pad' cannot fit {'x'.join(map(str, shape))} {what} into "
            f"{'x'.join(map(str, target))}; use {others}, or a larger size"
        )
    out = x.new_zeros(*x.shape[:2], *target)
    region = tuple(
        slice((t - n) // 2, (t - n) // 2 + n) for n, t in zip(shape, target, strict=True)
    )
    out[(slice(None), slice(None), *region)] = x
    return out


def slices_volumes(ndim: int, preprocess: Any) -> bool:
    """Whether volumes go through a 2D network slice by slice; volume-native networks (fed by
    ``VolumePreprocess``) take them whole."""
    return ndim == 3 and not isinstance(preprocess, VolumePreprocess)


@dataclass(frozen=True)
class PairResize:
    """``PairResize(256)(image, mask)`` -> (image, mask) at a fixed shape, masks always nearest.

    ``image`` is one case, channel-last: (H, W), (H, W, C) or a volume (D, H, W); ``mask`` its
    integer label map of the same spatial shape. ``size`` is one edge length (a square or cube)
    or a full shape. Modes: ``linear`` (image bilinear or trilinear, antialiased when a 2D image
    shrinks; mask nearest), ``nearest`` (both nearest), ``pad`` (both centred on a canvas of
    zeros, i.e. black and background; a case larger than ``size`` is refused). The image keeps
    its dtype (uint8 rounded back), the mask its integer dtype. ``restore`` maps a predicted
    mask back to the case's own shape for metrics in its voxel spacing.
    """

    size: int | tuple[int, ...]
    mode: str = "linear"

    def __post_init__(self) -> None:
        if self.mode not in PAIR_RESIZE_MODES:
            raise ConfigError(
                f"resize={self.mode!r} is not one of {list(PAIR_RESIZE_MODES)} for segmentation."
                f"{did_you_mean(str(self.mode), list(PAIR_RESIZE_MODES))}"
            )
        sizes = (self.size,) if isinstance(self.size, int | np.integer) else tuple(self.size)
        if not sizes or any(int(n) < 1 for n in sizes):
            raise ConfigError(f"size must be positive edge lengths, got {self.size!r}")

    def shape(self, ndim: int) -> tuple[int, ...]:
        if isinstance(self.size, int | np.integer):
            return (int(self.size),) * ndim
        if len(self.size) != ndim:
            raise ConfigError(f"size {tuple(self.size)} does not fit {ndim}D cases")
        return tuple(int(n) for n in self.size)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = np.asarray(mask)
        image = np.asarray(image)
        spatial = mask.shape
        if image.shape[: mask.ndim] != spatial or image.ndim - mask.ndim not in (0, 1):
            raise DataError(
                f"image of shape {image.shape} and mask of shape {mask.shape} differ in their "
                "spatial shape; a mask must have the shape of its image"
            )
        target = self.shape(mask.ndim)
        channels_last = image.ndim > mask.ndim
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        x = x.permute(-1, *range(mask.ndim))[None] if channels_last else x[None, None]
        y = resize(x, target, self.mode, "cases", PAIR_RESIZE_MODES)[0]
        y = y.permute(*range(1, mask.ndim + 1), 0) if channels_last else y[0]
        out = y.numpy()
        if image.dtype == np.uint8:
            out = np.clip(np.round(out), 0, 255).astype(np.uint8)
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        m = resize(
            m, target, "pad" if self.mode == "pad" else "nearest", "cases", PAIR_RESIZE_MODES
        )
        return out, m[0, 0].numpy().astype(mask.dtype)

    def restore(self, mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A mask at ``size`` back to the case's own ``shape``: cropped (pad) or nearest."""
        mask = np.asarray(mask)
        shape = tuple(int(n) for n in shape)
        if self.mode == "pad":
            start = [(t - n) // 2 for t, n in zip(mask.shape, shape, strict=True)]
            crop = tuple(slice(a, a + n) for a, n in zip(start, shape, strict=True))
            return mask[crop].copy()
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        return F.interpolate(m, size=shape, mode="nearest-exact")[0, 0].numpy().astype(mask.dtype)

    def describe(self) -> dict[str, Any]:
        """What a run record needs to say how cases and masks were brought to one shape."""
        image = {"linear": "bilinear/trilinear (antialiased when a 2D image shrinks)"}
        return {
            "size": self.size if isinstance(self.size, int) else list(self.size),
            "resize": self.mode,
            "image": image.get(self.mode, self.mode),
            "mask": "zero padding" if self.mode == "pad" else "nearest",
        }


class PairPreprocess(ABC):
    """Images and their masks to a network batch together: ``(images, masks) -> (x, y)``, x
    (B, C, *shape) float32 and y (B, *shape) int64 (zeros without ``masks``)."""

    ndim: int

    @abstractmethod
    def __call__(
        self, images: list[np.ndarray], masks: list[np.ndarray] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What a run record needs to say how cases and masks reached the network."""


@dataclass(frozen=True)
class SegmentationPreprocess(PairPreprocess):
    """Segmentation cases to a network batch: ``pair`` brings each image and its mask to one
    shape (masks nearest, never interpolated), ``normalise`` (a ``Preprocess`` or
    ``VolumePreprocess`` of the same edge length, so it does not resize again) scales and
    normalises the images as the backbone expects."""

    pair: PairResize
    normalise: Preprocess | VolumePreprocess

    @property
    def ndim(self) -> int:
        return 3 if isinstance(self.normalise, VolumePreprocess) else 2

    def __call__(
        self, images: list[np.ndarray], masks: list[np.ndarray] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): x (B, C, *shape) float32, y (B, *shape) int64; without ``masks`` y is zeros
        (prediction)."""
        pairs = []
        channels = ((), (1,), (3,)) if self.ndim == 2 else ((),)  # what normalise takes
        for i, image in enumerate(images):
            image = np.asarray(image)
            mask = None if masks is None else np.asarray(masks[i])
            spatial = image.shape[: self.ndim]
            if (  # a volume's depth must not pass for an image's channels
                len(spatial) < self.ndim
                or image.shape[self.ndim :] not in channels
                or (mask is not None and mask.ndim != self.ndim)
            ):
                what = "volumes (D, H, W)" if self.ndim == 3 else "images (H, W) or (H, W, C)"
                of_mask = "" if mask is None else f" with a mask of shape {mask.shape}"
                raise DataError(
                    f"this network takes {what}, got a case of shape {image.shape}{of_mask}; "
                    "3D cases reach a 2D backbone slice by slice"
                )
            pairs.append(self.pair(image, np.zeros(spatial, np.uint8) if mask is None else mask))
        x = self.normalise(np.stack([image for image, _ in pairs]))
        y = torch.from_numpy(np.stack([mask for _, mask in pairs]).astype(np.int64))
        return x, y

    def describe(self) -> dict[str, Any]:
        return {**self.normalise.describe(), **self.pair.describe()}
