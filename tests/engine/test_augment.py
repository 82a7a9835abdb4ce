"""Augmentations: shapes, reproducibility, identity for "none", no colour on grayscale,
transforms applied with the configured probability, and segmentation masks moved exactly with
their images."""

from __future__ import annotations

import pytest
import torch

from clinadapt.engine.augment import AugmentConfig, Augmenter, resolve_augment
from clinadapt.errors import ConfigError, DataError


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


ALL = AugmentConfig(hflip=0.5, vflip=0.5, dflip=0.5, affine=0.7, intensity=0.6, color=0.5)


def blocky_masks(n: int, spatial: tuple[int, ...], labels: list[int], seed: int) -> torch.Tensor:
    """Label maps made of 4-pixel blocks (large regions, so most pixels are interior); every
    label occurs in every map."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(len(labels), (n, *(s // 4 for s in spatial)), generator=generator)
    coarse.view(n, -1)[:, : len(labels)] = torch.arange(len(labels))
    for axis in range(1, coarse.ndim):
        coarse = coarse.repeat_interleave(4, dim=axis)
    return torch.tensor(labels)[coarse]


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((6, 3, 12, 12), (-550.0107021927834, -6.5375418066978455)),
        ((3, 3, 5, 10, 10), (731.1882545539993, 78.32737708685454)),
    ],
)
def test_masks_leave_the_images_and_random_numbers_unchanged(shape, expected):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    y = torch.randint(3, (shape[0], *shape[2:]), generator=torch.Generator().manual_seed(0))
    plain, with_masks = Augmenter(ALL, 11), Augmenter(ALL, 11)
    for _ in range(2):
        out = plain(x)
        out_x, _ = with_masks(x, y)
        assert torch.equal(out, out_x)
    assert torch.equal(plain.generator.get_state(), with_masks.generator.get_state())
    # pinned against the implementation from before masks existed: same draws, same order
    first = Augmenter(ALL, 11)(x).double()
    weights = torch.arange(first.numel(), dtype=torch.float64).view(first.shape) % 7 - 3
    got = (first.sum().item(), (first * weights).sum().item())
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("spatial", [(16, 12), (6, 16, 12)])
def test_flips_move_masks_exactly_with_their_images(spatial):
    y = blocky_masks(64, spatial, [0, 1, 2, 5], seed=1)
    x = y[:, None].float()
    config = AugmentConfig(hflip=0.5, vflip=0.5, dflip=0.5)
    out_x, out_y = Augmenter(config, 0)(x, y)
    assert torch.equal(out_x[:, 0], out_y.float())
    flipped = ~(out_y == y).flatten(1).all(1)
    assert 0.5 < flipped.float().mean().item() < 1.0  # flipped some, not all


@pytest.mark.parametrize("spatial", [(32, 28), (4, 32, 28)])
def test_affine_moves_masks_with_their_images(spatial):
    """The image holds one channel per label (the mask, one-hot, as floats), so its (bi/tri)linear
    warp names the label wherever all interpolated neighbours agree: a channel at 1 means that
    label, all channels at 0 means padding. The nearest neighbour is one of those neighbours, so
    there the warped mask must say exactly the same."""
    labels = [0, 3, 7]
    y = blocky_masks(32, spatial, labels, seed=2)
    x = torch.stack([(y == v).float() for v in labels], dim=1)
    config = AugmentConfig(hflip=0.5, affine=1.0, rotate_deg=40.0, scale=(0.7, 1.3))
    out_x, out_y = Augmenter(config, 0)(x, y)
    top, which = out_x.max(dim=1)
    label = torch.tensor(labels)[which]
    inside = top > 1 - 1e-4
    outside = out_x.sum(dim=1) < 1e-4
    assert torch.equal(out_y[inside], label[inside])
    assert (out_y[outside] == 0).all()
    assert inside.float().mean() > 0.3 and outside.any()  # many pixels checked, padding too
    assert not torch.equal(out_y, y)


def test_masks_keep_their_dtype_and_labels_and_pad_with_background():
    for dtype in (torch.int64, torch.int32, torch.uint8):
        y = blocky_masks(16, (20, 20), [1, 4, 9], seed=3).to(dtype)  # no background at all
        x = torch.randn(16, 3, 20, 20)
        out_x, out_y = Augmenter(resolve_augment("medium", grayscale=True), 0)(x, y)
        assert out_y.dtype == dtype and out_y.shape == y.shape and out_x.shape == x.shape
        assert set(out_y.unique().tolist()) == {0, 1, 4, 9}  # 0 only from padding


def test_volume_masks_rotate_in_plane_only():
    plane = blocky_masks(8, (16, 16), [0, 1], seed=4)
    depth = torch.arange(1, 6).view(1, 5, 1, 1)
    y = plane[:, None] * depth  # slice d holds the same shape with label d + 1
    x = torch.randn(8, 1, 5, 16, 16)
    config = AugmentConfig(hflip=0.5, vflip=0.5, affine=1.0, rotate_deg=30.0)
    _, out_y = Augmenter(config, 0)(x, y)
    moved = out_y[:, 0]  # the first slice, label 1
    assert not torch.equal(moved, plane)
    assert torch.equal(out_y, moved[:, None] * depth)  # slices warped alike, none mixed in


def test_masks_that_do_not_fit_the_images_are_refused():
    x = torch.randn(2, 3, 8, 8)
    augment = Augmenter(resolve_augment("light", grayscale=True), 0)
    with pytest.raises(DataError, match=r"\(2, 3, 8, 8\).*\(2, 8, 8\)"):
        augment(x, torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(DataError, match=r"\(2, 8, 9\)"):
        augment(x, torch.zeros(2, 8, 9, dtype=torch.int64))
    with pytest.raises(DataError, match="integer"):
        augment(x, torch.zeros(2, 8, 8))
    y = torch.zeros(2, 8, 8, dtype=torch.int64)
    none = Augmenter(resolve_augment("none", grayscale=True), 0)
    out_x, out_y = none(x, y)
    assert out_x is x and out_y is y
    with pytest.raises(DataError, match="shape"):
        none(x, y[:1])
