"""Self-supervised views: counts and sizes, reproducibility and resuming, crops and blur against
naive references, grayscale kept grayscale, and configuration errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from clinadapt.errors import ConfigError
from clinadapt.ssl.views import (
    PRESETS,
    ViewConfig,
    ViewGenerator,
    gaussian_blur,
    resized_crop,
    resolve_views,
)

PLAIN = {"hflip": 0.0, "intensity": 0.0, "blur": 0.0, "global_blur": ()}


def gray_batch(n: int, *spatial: int) -> torch.Tensor:
    """Normalised grayscale repeated to 3 channels with ImageNet-like per-channel mean/std."""
    g = torch.rand(n, 1, *spatial, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, *[1] * len(spatial))
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, *[1] * len(spatial))
    return (g.expand(-1, 3, *spatial) - mean) / std


@pytest.mark.parametrize(
    "spatial,glob,local",
    [((28, 28), (28, 28), (12, 12)), ((6, 14, 14), (6, 14, 14), (4, 6, 6))],
)
def test_counts_and_sizes(spatial, glob, local):
    config = resolve_views("dino", {"noise": 0.5}, grayscale=True)
    x = gray_batch(3, *spatial)
    views = ViewGenerator(config, 0)(x)
    assert len(views) == 8
    assert [tuple(v.shape[2:]) for v in views] == [glob] * 2 + [local] * 6
    assert all(v.shape[:2] == x.shape[:2] and v.dtype == x.dtype for v in views)
    assert all(torch.isfinite(v).all() for v in views)


def test_configured_sizes():
    generator = ViewGenerator(ViewConfig(global_size=224), 0)
    assert generator.sizes(512) == (224, 96)
    assert generator.sizes((32, 256, 256)) == ((28, 224, 224), (12, 96, 96))
    assert ViewGenerator(ViewConfig(), 0).sizes(28) == (28, 12)
    assert ViewGenerator(ViewConfig(local_size=8), 0).sizes((20, 40)) == ((20, 40), (8, 8))
    views = ViewGenerator(ViewConfig(global_size=8, local_views=1, local_size=5), 0)(
        gray_batch(2, 16, 20)
    )
    assert [tuple(v.shape[2:]) for v in views] == [(8, 8), (8, 8), (5, 5)]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("spatial", [(16, 16), (4, 12, 12)])
def test_determinism_and_resuming(preset, spatial):
    config = resolve_views(preset, {"noise": 0.5, "vflip": 0.5, "dflip": 0.5}, grayscale=False)
    x = torch.randn(4, 3, *spatial, generator=torch.Generator().manual_seed(0))
    a, b, c = ViewGenerator(config, 7), ViewGenerator(config, 7), ViewGenerator(config, 8)
    first = a(x)
    assert all(torch.equal(u, v) for u, v in zip(first, b(x), strict=True))
    assert not torch.equal(first[0], c(x)[0])
    assert not torch.equal(first[0], a(x)[0])  # the generator moves on
    state = a.generator.get_state()
    expected = a(x)
    resumed = ViewGenerator(config, 123)
    resumed.generator.set_state(state)
    assert all(torch.equal(u, v) for u, v in zip(expected, resumed(x), strict=True))


@pytest.mark.parametrize("spatial", [(9, 12), (5, 7, 6)])
def test_full_crop_without_transforms_is_identity(spatial):
    config = ViewConfig(global_scale=(1.0, 1.0), ratio=(1.0, 1.0), **PLAIN)
    x = torch.randn(3, 2, *spatial, generator=torch.Generator().manual_seed(0))
    views = ViewGenerator(config, 0)(x)
    for view in views:
        torch.testing.assert_close(view, x, atol=1e-5, rtol=0)
    flipped = ViewGenerator(dataclasses.replace(config, hflip=1.0, vflip=1.0), 0)(x)[0]
    torch.testing.assert_close(flipped, x.flip(-1, -2), atol=1e-5, rtol=0)


def test_resized_crop_matches_slicing_and_interpolation():
    """Axis-aligned pixel boxes: a crop the size of the output is a plain slice, and a box twice
    its size is its bilinear resize (no border effects when downsampling by two)."""
    h, w, out = 20, 24, (4, 6)
    x = torch.randn(3, 2, h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    boxes = [(3, 5, 4, 6), (0, 0, 8, 12), (12, 12, 8, 12)]  # top, left, height, width
    centre = torch.tensor(
        [[2 * (top + bh / 2) / h - 1, 2 * (left + bw / 2) / w - 1] for top, left, bh, bw in boxes],
        dtype=torch.float64,
    )
    extent = torch.tensor([[bh / h, bw / w] for _, _, bh, bw in boxes], dtype=torch.float64)
    crops = resized_crop(x, centre, extent, out)
    for i, (top, left, bh, bw) in enumerate(boxes):
        patch = x[i : i + 1, :, top : top + bh, left : left + bw]
        expected = F.interpolate(patch, size=out, mode="bilinear", align_corners=False)
        torch.testing.assert_close(crops[i : i + 1], expected)
    torch.testing.assert_close(crops[0], x[0, :, 3:7, 5:11])
    flipped = resized_crop(x, centre, extent * torch.tensor([1.0, -1.0], dtype=torch.float64), out)
    torch.testing.assert_close(flipped, crops.flip(-1))


def test_resized_crop_volume_matches_slicing():
    x = torch.randn(2, 1, 6, 8, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # depth 2..5, rows 2..7, columns 4..9 (sizes 4, 6, 6): a pure shift, then a 2x downsample
    centre = torch.tensor([[2 * 4 / 6 - 1, 2 * 5 / 8 - 1, 2 * 7 / 10 - 1]] * 2, dtype=torch.float64)
    extent = torch.tensor([[4 / 6, 6 / 8, 6 / 10]] * 2, dtype=torch.float64)
    crops = resized_crop(x, centre, extent, (4, 6, 6))
    torch.testing.assert_close(crops, x[:, :, 2:6, 2:8, 4:10])
    small = resized_crop(x, centre, extent, (2, 3, 3))
    expected = F.interpolate(x[:, :, 2:6, 2:8, 4:10], size=(2, 3, 3), mode="trilinear")
    torch.testing.assert_close(small, expected)


@pytest.mark.parametrize("spatial", [(64, 48), (27, 64, 48)])
def test_random_crops_have_the_drawn_area_and_fit(spatial):
    """Crops of coordinate ramps show each view's box: its area fraction lies in the scale range,
    its aspect ratio in the ratio range (unless the box spans the image) and it lies inside the
    image; a volume's fraction is split evenly with depth."""
    scale, ratio, n, count = (0.3, 0.9), (3 / 4, 4 / 3), 32, 4
    config = ViewConfig(
        global_views=count, global_size=16, global_scale=scale, ratio=ratio, **PLAIN
    )
    size = ViewGenerator(config, 0).sizes(spatial)[0]  # smaller than any box: ramps stay linear
    axes = torch.meshgrid(*[torch.arange(d, dtype=torch.float64) for d in spatial], indexing="ij")
    x = torch.stack(axes).unsqueeze(0).expand(n, -1, *spatial)  # channel k: index along axis k
    starts, lengths = [], []
    for view in ViewGenerator(config, 0)(x):
        for k, d in enumerate(spatial):
            ramp = view[:, k].movedim(k + 1, 1).flatten(2).mean(2)  # (n, size[k])
            length = (ramp[:, -1] - ramp[:, 0]) * size[k] / (size[k] - 1)  # in pixels
            starts.append((ramp[:, 0] + 0.5 - length / (2 * size[k])) / d)  # pixel edges
            lengths.append(length / d)
    start = torch.stack(starts).view(count, len(spatial), n)
    fraction = torch.stack(lengths).view(count, len(spatial), n)
    assert start.min() >= -1e-9 and (start + fraction).max() <= 1 + 1e-9
    area = fraction.prod(dim=1)
    assert area.min() >= scale[0] - 1e-9 and area.max() <= scale[1] + 1e-9
    assert area.std() > 0.05  # the boxes vary
    inside = (fraction[:, -2:] < 1 - 1e-9).all(dim=1)
    aspect = (fraction[:, -1] * spatial[-1] / (fraction[:, -2] * spatial[-2]))[inside]
    assert inside.float().mean() > 0.5
    assert aspect.min() >= ratio[0] - 1e-9 and aspect.max() <= ratio[1] + 1e-9
    spanning = fraction[:, -2:].amax(dim=1)[~inside]  # the others keep their area
    torch.testing.assert_close(spanning, torch.ones_like(spanning))
    if len(spatial) == 3:
        torch.testing.assert_close(fraction[:, 0], area ** (1 / 3))


@pytest.mark.parametrize("spatial", [(11, 13), (7, 9, 8)])
def test_blur_matches_scipy(spatial):
    x = torch.randn(2, 2, *spatial, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.6])
    out = gaussian_blur(x, sigma)
    for i in range(2):
        for ch in range(2):
            # torch's "reflect" is scipy's "mirror"; the kernel is cut at 3 sigma of the largest
            expected = gaussian_filter(
                x[i, ch].numpy(), float(sigma[i]), mode="mirror", truncate=3.0 / float(sigma[i])
            )
            np.testing.assert_allclose(out[i, ch].numpy(), expected, atol=1e-12)


def test_blur_probability_per_global_view():
    config = resolve_views(
        "dino",
        {**PLAIN, "global_blur": [1.0, 0.0], "blur_sigma": [1.0, 1.0], "local_views": 0},
        grayscale=True,
    )
    config = dataclasses.replace(config, global_scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    blurred, plain = ViewGenerator(config, 0)(x)
    torch.testing.assert_close(plain, x, atol=1e-5, rtol=0)
    assert (blurred - x).flatten(1).abs().amax(1).min() > 1e-3
    assert resolve_views("dino", grayscale=True).global_blur == (1.0, 0.1)


@pytest.mark.parametrize("spatial", [(12, 12), (4, 10, 10)])
def test_grayscale_channels_stay_equal(spatial):
    config = resolve_views("dino", {"noise": 1.0, "intensity": 1.0}, grayscale=True)
    x = gray_batch(16, *spatial)
    shape = (1, 3, *[1] * len(spatial))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(shape)
    std = torch.tensor([0.229, 0.224, 0.225]).view(shape)
    for view in ViewGenerator(config, 0)(x):
        pixels = view * std + mean  # back in pixel space, the three channels are still equal
        torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-5, rtol=0)


def test_colour_only_on_rgb():
    assert resolve_views("simclr", grayscale=True).color == 0
    assert resolve_views("simclr", grayscale=False).color > 0
    assert resolve_views("dino", grayscale=False).color > 0
    assert resolve_views("mae", grayscale=False).color == 0
    with pytest.raises(ConfigError, match="RGB"):
        resolve_views("mae", {"color": 0.5}, grayscale=True)
    x = torch.rand(4, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    config = resolve_views("mae", {"color": 1.0, **PLAIN}, grayscale=False)
    (view,) = ViewGenerator(
        dataclasses.replace(config, global_scale=(1.0, 1.0), ratio=(1.0, 1.0)), 0
    )(x)
    assert not torch.allclose(view, x, atol=1e-3)


def test_noise_scales_with_the_image_range():
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 50
    config = ViewConfig(
        global_scale=(1.0, 1.0), ratio=(1.0, 1.0), noise=1.0, noise_std=0.1, **PLAIN
    )
    (view,) = ViewGenerator(dataclasses.replace(config, global_views=1), 0)(x)
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    std = (view - x).flatten(1).std(1) / span
    assert math.isclose(std.mean().item(), 0.1, rel_tol=0.05)


def test_bad_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="simclrr.*Did you mean 'simclr'"):
        resolve_views("simclrr", grayscale=True)
    with pytest.raises(ConfigError, match="local_view.*local_views"):
        resolve_views("dino", {"local_view": 4}, grayscale=True)
    bad = [
        ({"blur": 1.5}, "probability"),
        ({"global_blur": [0.5, 2.0]}, "global_blur"),
        ({"global_scale": [0.5, 1.5]}, "global_scale"),
        ({"local_scale": [0.4, 0.1]}, "local_scale"),
        ({"ratio": [0.0, 1.0]}, "ratio"),
        ({"blur_sigma": [0.0, 1.0]}, "blur_sigma"),
        ({"global_views": 0}, "at least 1"),
        ({"local_size": -1}, "negative"),
        ({"contrast": 1.0}, "below 1"),
    ]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            resolve_views("dino", options, grayscale=True)
    with pytest.raises(ValueError, match="expected"):
        ViewGenerator(ViewConfig(), 0)(torch.zeros(2, 8, 8))
