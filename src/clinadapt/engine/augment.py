"""Training augmentations for medical images, applied to normalised batches on the device.

They work on what ``Preprocess`` returns, (B, C, H, W), and on volumes (B, C, D, H, W), so no
image is decoded twice. Intensity operations run in each image's own [min, max] range per
channel, which is the pixel range mapped affinely, so they need no knowledge of the
normalisation and keep repeated grayscale channels identical. Geometric operations pad with
the image's minimum (black background), not with zero (the normalised mean grey).

Segmentation targets, integer masks (B, H, W) or (B, D, H, W), can come along: they get exactly
the image's flips and affine (the same sampling grid, nearest neighbour, background 0 outside),
never the intensity or colour transforms, and passing them draws no extra random numbers, so the
images come out the same with or without masks.

Grayscale images never get colour jitter: it would invent colours that no scanner produces.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, overload

import torch
import torch.nn.functional as F

from clinadapt.config import from_dict
from clinadapt.errors import ConfigError, DataError
from clinadapt.registry import did_you_mean

AUGMENTS = ("auto", "none", "light", "medium")


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (per image) and ranges of each random transform; 0 disables a transform."""

    hflip: float = field(default=0.0, metadata={"help": "probability of a left-right flip"})
    vflip: float = field(default=0.0, metadata={"help": "probability of an up-down flip"})
    dflip: float = field(default=0.0, metadata={"help": "probability of a depth flip (3D)"})
    affine: float = field(
        default=0.0, metadata={"help": "probability of a random in-plane rotation and scaling"}
    )
    rotate_deg: float = field(default=10.0, metadata={"help": "rotation range, +- degrees"})
    scale: tuple[float, float] = field(
        default=(0.9, 1.1), metadata={"help": "zoom range (min, max); >1 zooms in"}
    )
    intensity: float = field(
        default=0.0, metadata={"help": "probability of brightness/contrast/gamma jitter"}
    )
    brightness: float = field(default=0.1, metadata={"help": "shift range, fraction of range"})
    contrast: float = field(default=0.1, metadata={"help": "contrast factor range 1 +- this"})
    gamma: float = field(default=0.1, metadata={"help": "gamma in [1/(1+g), 1+g]"})
    color: float = field(
        default=0.0, metadata={"help": "probability of colour jitter (RGB images only)"}
    )
    saturation: float = field(default=0.1, metadata={"help": "saturation factor range 1 +- this"})
    channel_gain: float = field(default=0.05, metadata={"help": "per-channel gain range 1 +- this"})

    @property
    def active(self) -> bool:
        return any(
            p > 0
            for p in (self.hflip, self.vflip, self.dflip, self.affine, self.intensity, self.color)
        )


PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "light": AugmentConfig(hflip=0.5, affine=0.5, intensity=0.5),
    "medium": AugmentConfig(
        hflip=0.5,
        vflip=0.5,
        affine=0.8,
        rotate_deg=15.0,
        scale=(0.85, 1.15),
        intensity=0.8,
        brightness=0.2,
        contrast=0.2,
        gamma=0.2,
    ),
}
_MILD_COLOR = {"color": 0.5, "saturation": 0.1, "channel_gain": 0.05}


def resolve_augment(
    name: str, options: dict[str, Any] | None = None, *, grayscale: bool
) -> AugmentConfig:
    """The preset ``name`` with ``options`` (AugmentConfig fields) overriding it.

    ``auto`` is ``light`` for grayscale and ``light`` plus mild colour jitter for RGB.
    """
    if name not in AUGMENTS:
        raise ConfigError(
            f"augment={name!r} is not one of {list(AUGMENTS)}.{did_you_mean(name, list(AUGMENTS))}"
        )
    base = PRESETS["light" if name == "auto" else name]
    values = dataclasses.asdict(base)
    if name == "auto" and not grayscale:
        values.update(_MILD_COLOR)
    values.update(options or {})
    config = from_dict(AugmentConfig, values, where="augment_options")
    _check(config, grayscale)
    return config


def _check(config: AugmentConfig, grayscale: bool) -> None:
    for key in ("hflip", "vflip", "dflip", "affine", "intensity", "color"):
        if not 0.0 <= getattr(config, key) <= 1.0:
            raise ConfigError(f"augment_options.{key} is a probability in [0, 1]")
    for key in ("rotate_deg", "brightness", "contrast", "gamma", "saturation", "channel_gain"):
        if getattr(config, key) < 0:
            raise ConfigError(f"augment_options.{key} must not be negative")
    if config.contrast >= 1 or config.saturation >= 1 or config.channel_gain >= 1:
        raise ConfigError("augment_options contrast, saturation and channel_gain must be below 1")
    low, high = config.scale if len(config.scale) == 2 else (0.0, -1.0)
    if not 0 < low <= high:
        raise ConfigError(
            f"augment_options.scale must be (min, max) with 0 < min <= max, got {config.scale}"
        )
    if grayscale and config.color > 0:
        raise ConfigError(
            "colour jitter (augment_options.color) needs RGB images; these images are grayscale"
        )


class Augmenter:
    """Applies an ``AugmentConfig`` to a batch; all randomness comes from ``self.generator``
    (on the CPU, whatever the batch's device) so runs are reproducible and resumable."""

    def __init__(self, config: AugmentConfig, seed: int) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)

    @overload
    def __call__(self, x: torch.Tensor, y: None = None) -> torch.Tensor: ...

    @overload
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The augmented batch ``x``, or ``(x, y)`` with the masks ``y`` moved along with it."""
        if y is not None:
            _check_masks(x, y)
        if self.config.active:
            if x.ndim not in (4, 5):
                raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
            c = self.config
            x, y = self._flip(x, y, c.hflip, -1)
            x, y = self._flip(x, y, c.vflip, -2)
            if x.ndim == 5:
                x, y = self._flip(x, y, c.dflip, -3)
            if c.affine > 0:
                x, y = self._affine(x, y)
            if c.intensity > 0:
                x = self._intensity(x)
            if c.color > 0:
                x = self._color(x)
        return x if y is None else (x, y)

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator, dtype=torch.float64)

    def _chosen(self, n: int, p: float, device: torch.device) -> torch.Tensor:
        """A boolean mask of the images that get a transform applied with probability ``p``."""
        return (torch.rand(n, generator=self.generator) < p).to(device)

    def _flip(
        self, x: torch.Tensor, y: torch.Tensor | None, p: float, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if p <= 0:
            return x, y
        chosen = self._chosen(x.shape[0], p, x.device)
        x = torch.where(chosen.view(-1, *[1] * (x.ndim - 1)), x.flip(dim), x)
        if y is not None:
            y = torch.where(chosen.view(-1, *[1] * (y.ndim - 1)), y.flip(dim), y)
        return x, y

    def _affine(
        self, x: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        c, n = self.config, x.shape[0]
        chosen = self._chosen(n, c.affine, x.device)
        angle = self._uniform(n, -c.rotate_deg, c.rotate_deg) * math.pi / 180
        zoom = self._uniform(n, *c.scale)
        idx = chosen.nonzero().flatten()
        if not len(idx):
            return x, y
        cos, sin = (torch.cos(angle) / zoom)[idx.cpu()], (torch.sin(angle) / zoom)[idx.cpu()]
        spatial = x.ndim - 2
        theta = torch.zeros(len(idx), spatial, spatial + 1, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        if spatial == 3:
            theta[:, 2, 2] = 1.0  # rotate and zoom in-plane (H, W); depth is untouched
        picked = x[idx]
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(picked.shape), align_corners=False)
        floor = picked.flatten(2).amin(dim=2).view(*picked.shape[:2], *[1] * spatial)
        warped = (
            F.grid_sample(picked - floor, grid, align_corners=False, padding_mode="zeros") + floor
        )
        x = x.clone()
        x[idx] = warped
        if y is not None:
            y = y.clone()
            y[idx] = _warp_masks(y[idx], grid)
        return x, y

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        c, n = self.config, x.shape[0]
        chosen = self._chosen(n, c.intensity, x.device)
        log_g = math.log1p(c.gamma)
        gamma = torch.exp(self._uniform(n, -log_g, log_g))
        contrast = self._uniform(n, 1 - c.contrast, 1 + c.contrast)
        shift = self._uniform(n, -c.brightness, c.brightness)
        shape = (n, *[1] * (x.ndim - 1))
        return torch.where(chosen.view(shape), adjust_intensity(x, gamma, contrast, shift), x)

    def _color(self, x: torch.Tensor) -> torch.Tensor:
        c, (n, channels) = self.config, x.shape[:2]
        chosen = self._chosen(n, c.color, x.device)
        gain = self._uniform(n * channels, 1 - c.channel_gain, 1 + c.channel_gain)
        saturation = self._uniform(n, 1 - c.saturation, 1 + c.saturation)
        shape = (n, 1, *[1] * (x.ndim - 2))
        return torch.where(chosen.view(shape), adjust_color(x, gain, saturation), x)


def _check_masks(x: torch.Tensor, y: torch.Tensor) -> None:
    expected = (x.shape[0], *x.shape[2:])
    if tuple(y.shape) != expected:
        raise DataError(
            f"masks of shape {tuple(y.shape)} do not fit images of shape {tuple(x.shape)}: "
            f"expected {expected} (the images' batch and spatial sizes, no channel axis)"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex:
        raise DataError(f"masks must hold integer labels, got dtype {y.dtype}")


def _warp_masks(y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Label maps (B, *spatial) resampled at ``grid`` (from ``F.affine_grid``) by nearest
    neighbour, background 0 outside; labels stay exact and keep their dtype."""
    dtype = torch.promote_types(grid.dtype, torch.float32)  # exact labels even for fp16 images
    warped = F.grid_sample(
        y[:, None].to(dtype),
        grid.to(dtype),
        mode="nearest",
        padding_mode="zeros",
        align_corners=False,
    )
    return warped[:, 0].to(y.dtype)


def adjust_intensity(
    x: torch.Tensor, gamma: torch.Tensor, contrast: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """Gamma, contrast about the mean and a brightness shift (a fraction of the range), one value
    of each per image, in each image's own range per channel so that the normalisation does not
    matter and repeated grayscale channels stay identical."""
    unit, low, span = to_unit(x)
    shape = (x.shape[0], *[1] * (x.ndim - 1))
    g, k, b = (v.to(x.device, x.dtype).view(shape) for v in (gamma, contrast, shift))
    y = unit.clamp_min(0) ** g
    mean = y.flatten(1).mean(dim=1).view(shape)
    y = ((y - mean) * k + mean + b).clamp(0, 1)
    return y * span + low


def adjust_color(x: torch.Tensor, gain: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """Per-channel gains (B * C values) and a saturation factor per image, in each image's own
    range per channel; meant for RGB images only."""
    n, channels = x.shape[:2]
    spatial = [1] * (x.ndim - 2)
    unit, low, span = to_unit(x)
    y = unit * gain.to(x.device, x.dtype).view(n, channels, *spatial)
    grey = y.mean(dim=1, keepdim=True)
    s = saturation.to(x.device, x.dtype).view(n, 1, *spatial)
    y = (grey + (y - grey) * s).clamp(0, 1)
    return y * span + low


def to_unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` mapped to [0, 1] per image and channel, with the minimum and span to map back."""
    flat = x.flatten(2)
    shape = (*x.shape[:2], *[1] * (x.ndim - 2))
    low = flat.amin(dim=2).view(shape)
    span = (flat.amax(dim=2).view(shape) - low).clamp_min(1e-6)
    return (x - low) / span, low, span
