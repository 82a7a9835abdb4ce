"""Random views of a batch for self-supervised pretraining (SimCLR, DINO, MAE), 2D and 3D.

The crops follow the random-resized-crop recipes of SimCLR (Chen et al. 2020, "A Simple
Framework for Contrastive Learning of Visual Representations") and the global/local multi-crop
of DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"), on
volumes too: the volume fraction is split over depth and the image plane.

The photometric part is chosen for medical images. Brightness, contrast and gamma jitter and
Gaussian blur and noise model what differs between scanners, protocols and reconstruction
kernels, so features learnt to ignore them transfer across sites. They run in each view's own
[min, max] range per channel (see ``clinadapt.engine.augment``), so they need no knowledge of
the normalisation, and they draw one value per image, never per channel, so repeated grayscale
channels stay identical. Colour jitter, the strongest cue in SimCLR on photographs, is only
allowed on RGB images (dermoscopy, histology, fundus): on grayscale images it would invent
colours that no scanner produces.

Views are made on the batch's device from a normalised ``(B, C, H, W)`` or ``(B, C, D, H, W)``
batch; every random number comes from ``ViewGenerator.generator`` (a CPU generator whose state
the caller checkpoints), so runs are reproducible and resumable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
import torch.nn.functional as F

from clinadapt.config import from_dict
from clinadapt.engine.augment import adjust_color, adjust_intensity
from clinadapt.errors import ConfigError
from clinadapt.registry import did_you_mean


@dataclass(frozen=True)
class ViewConfig:
    """How many views of which size, and the probability (per view of an image) and range of each
    random transform; a probability of 0 disables a transform."""

    global_views: int = field(default=2, metadata={"help": "number of global views (at least 1)"})
    local_views: int = field(default=0, metadata={"help": "number of small local views (DINO)"})
    global_size: int = field(
        default=0, metadata={"help": "in-plane side of the global views; 0 = the input's size"}
    )
    local_size: int = field(
        default=0, metadata={"help": "in-plane side of the local views; 0 = 3/7 of the global"}
    )
    global_scale: tuple[float, float] = field(
        default=(0.4, 1.0), metadata={"help": "area (volume) fraction range of global crops"}
    )
    local_scale: tuple[float, float] = field(
        default=(0.05, 0.4), metadata={"help": "area (volume) fraction range of local crops"}
    )
    ratio: tuple[float, float] = field(
        default=(3 / 4, 4 / 3), metadata={"help": "crop aspect ratio (width / height) range"}
    )
    hflip: float = field(default=0.5, metadata={"help": "probability of a left-right flip"})
    vflip: float = field(default=0.0, metadata={"help": "probability of an up-down flip"})
    dflip: float = field(default=0.0, metadata={"help": "probability of a depth flip (3D)"})
    intensity: float = field(
        default=0.8, metadata={"help": "probability of brightness/contrast/gamma jitter"}
    )
    brightness: float = field(default=0.2, metadata={"help": "shift range, fraction of range"})
    contrast: float = field(default=0.2, metadata={"help": "contrast factor range 1 +- this"})
    gamma: float = field(default=0.2, metadata={"help": "gamma in [1/(1+g), 1+g]"})
    blur: float = field(default=0.5, metadata={"help": "probability of a Gaussian blur"})
    global_blur: tuple[float, ...] = field(
        default=(),
        metadata={"help": "blur probability of each global view in turn; views past it use blur"},
    )
    blur_sigma: tuple[float, float] = field(
        default=(0.1, 2.0), metadata={"help": "blur sigma range, in pixels of the view"}
    )
    noise: float = field(default=0.0, metadata={"help": "probability of additive Gaussian noise"})
    noise_std: float = field(default=0.05, metadata={"help": "noise std, fraction of the range"})
    color: float = field(
        default=0.0, metadata={"help": "probability of colour jitter (RGB images only)"}
    )
    saturation: float = field(default=0.1, metadata={"help": "saturation factor range 1 +- this"})
    channel_gain: float = field(default=0.05, metadata={"help": "per-channel gain range 1 +- this"})


PRESETS: dict[str, ViewConfig] = {
    "simclr": ViewConfig(global_scale=(0.2, 1.0)),
    # DINO blurs the first global view always and the second rarely, so the two differ in kind
    "dino": ViewConfig(local_views=6, global_blur=(1.0, 0.1)),
    "mae": ViewConfig(global_views=1, global_scale=(0.5, 1.0), intensity=0.0, blur=0.0),
}
_COLOR_PRESETS = ("simclr", "dino")


def resolve_views(
    preset: str, options: dict[str, Any] | None = None, *, grayscale: bool
) -> ViewConfig:
    """The preset ``preset`` with ``options`` (ViewConfig fields) overriding it.

    On RGB images the contrastive presets (``simclr``, ``dino``) add mild colour jitter, as the
    ``auto`` training augmentation does; grayscale images never get any.
    """
    names = list(PRESETS)
    if preset not in PRESETS:
        raise ConfigError(f"views={preset!r} is not one of {names}.{did_you_mean(preset, names)}")
    values = dataclasses.asdict(PRESETS[preset])
    if preset in _COLOR_PRESETS and not grayscale:
        values["color"] = 0.5
    values.update(options or {})
    config = from_dict(ViewConfig, values, where="view_options")
    _check(config, grayscale)
    return config


def _check(config: ViewConfig, grayscale: bool) -> None:
    for key in ("hflip", "vflip", "dflip", "intensity", "blur", "noise", "color"):
        if not 0.0 <= getattr(config, key) <= 1.0:
            raise ConfigError(f"view_options.{key} is a probability in [0, 1]")
    if not all(0.0 <= p <= 1.0 for p in config.global_blur):
        raise ConfigError("view_options.global_blur holds probabilities in [0, 1]")
    for key in ("global_views", "local_views", "global_size", "local_size"):
        if getattr(config, key) < 0:
            raise ConfigError(f"view_options.{key} must not be negative")
    if config.global_views < 1:
        raise ConfigError("view_options.global_views must be at least 1")
    for key in ("brightness", "contrast", "gamma", "noise_std", "saturation", "channel_gain"):
        if getattr(config, key) < 0:
            raise ConfigError(f"view_options.{key} must not be negative")
    if config.contrast >= 1 or config.saturation >= 1 or config.channel_gain >= 1:
        raise ConfigError("view_options contrast, saturation and channel_gain must be below 1")
    for key, top in (("global_scale", 1.0), ("local_scale", 1.0), ("ratio", math.inf)):
        _check_range(key, getattr(config, key), top)
    _check_range("blur_sigma", config.blur_sigma, math.inf)
    if grayscale and config.color > 0:
        raise ConfigError(
            "colour jitter (view_options.color) needs RGB images; these images are grayscale"
        )


def _check_range(key: str, value: tuple[float, ...], top: float) -> None:
    low, high = value if len(value) == 2 else (0.0, -1.0)
    if not 0 < low <= high <= top:
        bound = "" if math.isinf(top) else f" <= {top:g}"
        raise ConfigError(
            f"view_options.{key} must be (min, max) with 0 < min <= max{bound}, got {value}"
        )


def resized_crop(
    x: torch.Tensor, centre: torch.Tensor, extent: torch.Tensor, size: Sequence[int]
) -> torch.Tensor:
    """One box per image, resampled (bi/trilinear) to ``size`` in a single ``grid_sample``.

    ``centre`` and ``extent`` are (B, spatial dims) in the tensor's axis order ((D,) H, W): the
    box centre in [-1, 1] and its side as a fraction of each axis; a negative extent flips that
    axis. Edges repeat the border pixel, so a box that touches the border is not darkened.
    """
    n, dims = centre.shape
    theta = torch.zeros(n, dims, dims + 1, dtype=torch.float64, device=centre.device)
    axes = torch.arange(dims)
    theta[:, axes, axes] = extent.to(torch.float64).flip(1)  # affine_grid orders axes x, y, z
    theta[:, :, dims] = centre.to(torch.float64).flip(1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur with one ``sigma`` (in pixels) per image, over all spatial axes,
    with reflect padding; every channel of an image gets the same kernel.

    The kernel is cut at 3 sigma (of the largest) and at the image's size, and each axis is one
    grouped convolution over the whole batch.
    """
    n, channels, *spatial = x.shape
    sigma = sigma.to(torch.float64).view(n, 1)
    radius = math.ceil(3 * float(sigma.max()))
    y = x.reshape(1, n * channels, *spatial)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
    for axis, length in enumerate(spatial):
        r = min(radius, length - 1)
        if r == 0:
            continue
        offsets = torch.arange(-r, r + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
        shape = [1] * len(spatial)
        shape[axis] = 2 * r + 1
        weight = kernel.view(n * channels, 1, *shape).to(x.device, x.dtype)
        pad = [0] * (2 * len(spatial))
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = r
        y = conv(F.pad(y, pad, mode="reflect"), weight, groups=n * channels)
    return y.view(x.shape)


class ViewGenerator:
    """Makes ``config.global_views`` global then ``config.local_views`` local views of a batch;
    all randomness comes from ``self.generator`` (on the CPU, whatever the batch's device)."""

    def __init__(self, config: ViewConfig, seed: int) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)

    @overload
    def sizes(self, input_size: int) -> tuple[int, int]: ...

    @overload
    def sizes(self, input_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]: ...

    def sizes(
        self, input_size: int | Sequence[int]
    ) -> tuple[int, int] | tuple[tuple[int, ...], tuple[int, ...]]:
        """Global and local view sizes for a square side, or shapes for a spatial shape.

        A configured size sets the in-plane sides (square views) and scales the depth of volumes
        in proportion; local views default to 3/7 of the global view per axis (96 for 224), at
        least 4 pixels unless the global view is smaller.
        """
        if isinstance(input_size, int):
            glob, local = self.sizes((input_size, input_size))
            return glob[0], local[0]
        spatial = tuple(input_size)
        c, plane = self.config, max(spatial[-2:])

        def square(side: int) -> tuple[int, ...]:
            return (*(max(1, round(d * side / plane)) for d in spatial[:-2]), side, side)

        glob = square(c.global_size) if c.global_size else spatial
        if c.local_size:
            return glob, square(c.local_size)
        return glob, tuple(min(g, max(4, round(g * 3 / 7))) for g in glob)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The global views, then the local ones; every image gets its own crop and transforms."""
        if x.ndim not in (4, 5):
            raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
        c = self.config
        glob, local = self.sizes(tuple(x.shape[2:]))
        flat = x.flatten(2)
        span = (flat.amax(dim=2) - flat.amin(dim=2)).view(*x.shape[:2], *[1] * (x.ndim - 2))
        views = []
        for i in range(c.global_views):
            blur = c.global_blur[i] if i < len(c.global_blur) else c.blur
            views.append(self._view(x, span, glob, c.global_scale, blur))
        for _ in range(c.local_views):
            views.append(self._view(x, span, local, c.local_scale, c.blur))
        return views

    def _uniform(self, shape: int | tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def _chosen(self, n: int, p: float) -> torch.Tensor:
        """A CPU boolean mask of the images that get a transform with probability ``p``."""
        return torch.rand(n, generator=self.generator) < p

    def _view(
        self,
        x: torch.Tensor,
        span: torch.Tensor,
        size: tuple[int, ...],
        scale: tuple[float, float],
        blur: float,
    ) -> torch.Tensor:
        """One view: crop and flips, then intensity, colour, blur and noise, each drawn per image
        with its probability; noise is scaled by the range of the whole input image."""
        c, n = self.config, x.shape[0]
        centre, extent = self._box(n, tuple(x.shape[2:]), scale)
        y = resized_crop(x, centre, extent, size)
        shape = (n, *[1] * (x.ndim - 1))
        if c.intensity > 0:
            chosen = self._chosen(n, c.intensity).to(x.device)
            log_g = math.log1p(c.gamma)
            gamma = torch.exp(self._uniform(n, -log_g, log_g))
            contrast = self._uniform(n, 1 - c.contrast, 1 + c.contrast)
            shift = self._uniform(n, -c.brightness, c.brightness)
            y = torch.where(chosen.view(shape), adjust_intensity(y, gamma, contrast, shift), y)
        if c.color > 0:
            chosen = self._chosen(n, c.color).to(x.device)
            gain = self._uniform(n * x.shape[1], 1 - c.channel_gain, 1 + c.channel_gain)
            saturation = self._uniform(n, 1 - c.saturation, 1 + c.saturation)
            y = torch.where(chosen.view(shape), adjust_color(y, gain, saturation), y)
        if blur > 0:
            idx = self._chosen(n, blur).nonzero().flatten()
            sigma = self._uniform(n, *c.blur_sigma)
            if len(idx):
                at = idx.to(x.device)
                y = y.index_copy(0, at, gaussian_blur(y[at], sigma[idx]))
        if c.noise > 0:
            idx = self._chosen(n, c.noise).nonzero().flatten()
            if len(idx):
                at = idx.to(x.device)
                noise = torch.randn((len(idx), 1, *size), generator=self.generator)
                y = y.index_copy(
                    0, at, y[at] + noise.to(x.device, x.dtype) * c.noise_std * span[at]
                )
        return y

    def _box(
        self, n: int, spatial: tuple[int, ...], scale: tuple[float, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crop boxes as (centre, extent) for ``resized_crop``, flips included.

        The area (volume) fraction is uniform in ``scale`` and the aspect ratio (in pixels)
        log-uniform in ``config.ratio``; a volume's fraction is split evenly over the three axes
        before the aspect ratio shapes the in-plane sides. A box too wide or too tall for the
        image keeps its area and takes the full width or height. Centres are uniform where the
        box fits.
        """
        c = self.config
        fraction = self._uniform(n, *scale)
        aspect = torch.exp(self._uniform(n, math.log(c.ratio[0]), math.log(c.ratio[1])))
        height, width = spatial[-2:]
        sides = []
        area = fraction
        if len(spatial) == 3:
            depth = fraction ** (1 / 3)
            sides.append(depth)
            area = fraction / depth
        w = torch.sqrt(area * aspect * height / width).clamp(max=1.0)
        h = (area / w).clamp(max=1.0)
        sides += [h, area / h]
        extent = torch.stack(sides, dim=1)
        centre = (2 * self._uniform(extent.shape, 0.0, 1.0) - 1) * (1 - extent)
        flips = [c.dflip, c.vflip, c.hflip][-len(spatial) :]
        for axis, p in enumerate(flips):
            if p > 0:
                extent[:, axis] = torch.where(self._chosen(n, p), -extent[:, axis], extent[:, axis])
        return centre, extent
