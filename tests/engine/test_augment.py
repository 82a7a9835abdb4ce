"""Augmentations: shapes, reproducibility, identity for "none", no colour on grayscale, and
transforms applied with the configured probability."""

from __future__ import annotations

import pytest
import torch

from clinadapt.engine.augment import AugmentConfig, Augmenter, resolve_augment
from clinadapt.errors import ConfigError


def gray_batch(n: int, *spatial: int) -> torch.Tensor:
    """Normalised grayscale repeated to 3 channels with ImageNet-like per-channel mean/std."""
    g = torch.rand(n, 1, *spatial, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, *[1] * len(spatial))
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, *[1] * len(spatial))
    return (g.expand(-1, 3, *spatial) - mean) / std


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (2, 3, 6, 16, 16)])
@pytest.mark.parametrize("name", ["light", "medium", "auto"])
def test_shapes_dtype_and_determinism(shape, name):
    config = resolve_augment(name, grayscale=True)
    x = gray_batch(shape[0], *shape[2:])
    a, b, c = Augmenter(config, 7), Augmenter(config, 7), Augmenter(config, 8)
    out = a(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert torch.equal(out, b(x))
    assert not torch.equal(out, c(x))
    assert torch.equal(a(x), b(x))  # the generators advance in step


def test_none_is_identity():
    x = gray_batch(4, 8, 8)
    assert Augmenter(resolve_augment("none", grayscale=False), 0)(x) is x


def test_grayscale_gets_no_colour_and_stays_grayscale():
    gray, rgb = resolve_augment("auto", grayscale=True), resolve_augment("auto", grayscale=False)
    assert gray.color == 0 and rgb.color > 0
    assert resolve_augment("light", grayscale=False).color == 0  # colour only when asked
    with pytest.raises(ConfigError, match="RGB"):
        resolve_augment("light", {"color": 0.5}, grayscale=True)
    x = gray_batch(64, 12, 12)
    out = Augmenter(gray, 0)(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = out * std + mean  # back in pixel space, the three channels are still equal
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("key,dim", [("hflip", -1), ("vflip", -2)])
def test_flips_follow_their_probability(key, dim):
    n = 2000
    x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = Augmenter(AugmentConfig(**{key: 0.3}), 0)(x)
    flipped = (out == x.flip(dim)).flatten(1).all(1)
    unchanged = (out == x).flatten(1).all(1)
    assert bool((flipped | unchanged).all())
    assert abs(flipped.float().mean().item() - 0.3) < 0.04


def test_rotation_follows_its_probability_and_stays_small():
    n = 1000
    x = torch.zeros(n, 1, 15, 15)
    x[:, :, 2:13, 7] = 1.0  # a vertical bar through the centre
    config = AugmentConfig(affine=0.4, rotate_deg=10.0, scale=(1.0, 1.0))
    out = Augmenter(config, 0)(x)
    changed = ~torch.isclose(out, x, atol=1e-4).flatten(1).all(1)
    assert abs(changed.float().mean().item() - 0.4) < 0.05
    assert (out[:, :, 7, 7] > 0.9).all()  # the centre is fixed; +-10 degrees keeps the bar near


def test_volume_flips_and_rotates_in_plane_only():
    x = torch.randn(8, 1, 5, 10, 10, generator=torch.Generator().manual_seed(0))
    config = AugmentConfig(affine=1.0, rotate_deg=10.0)
    out = Augmenter(config, 0)(x)
    assert out.shape == x.shape
    # depth is untouched: each output slice depends only on the same input slice
    x2 = x.clone()
    x2[:, :, 0] = x[:, :, 0].flip(-1)  # same values (and minimum, the padding), other layout
    out2 = Augmenter(config, 0)(x2)
    torch.testing.assert_close(out[:, :, 1:], out2[:, :, 1:])


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean|hflip"):
        resolve_augment("light", {"hflp": 0.5}, grayscale=True)
    with pytest.raises(ConfigError, match="probability"):
        resolve_augment("light", {"hflip": 2}, grayscale=True)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_augment("heavy", grayscale=True)
