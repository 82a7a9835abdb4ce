"""Segmentation heads: exact output sizes in 2D and 3D, the decoder's stages and widths, parameter
counts, gradients, batch-size independence, a head that fits, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clinadapt.errors import ConfigError, DataError
from clinadapt.tasks.seg_heads import HEAD_KINDS, SegmentationHead

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def upsamplings(head: SegmentationHead) -> list[tuple[float, ...]]:
    return [m.scale_factor for m in head.modules() if isinstance(m, nn.Upsample)]


def convs(head: SegmentationHead) -> list[nn.Module]:
    return [m for m in head.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize(
    ("stride", "grid", "size"),
    [
        ((16, 16), (14, 14), (224, 224)),
        ((14, 14), (16, 16), (224, 224)),  # DINOv2: not a power of two
        ((32, 32), (3, 4), (101, 127)),  # odd sizes that the stride does not divide
        ((4, 4, 4), (4, 4, 4), (16, 16, 16)),
        ((7, 7, 7), (4, 4, 4), (28, 27, 29)),
        ((1, 8, 8), (5, 4, 4), (5, 32, 32)),  # slice-wise features of a volume
        ((1, 1), (9, 11), (9, 11)),  # full-resolution features (a U-Net)
    ],
)
def test_logits_have_exactly_the_requested_size(kind, stride, grid, size):
    head = SegmentationHead(24, 3, stride, kind)
    out = head(torch.randn(2, 24, *grid), size)
    assert out.shape == (2, 3, *size)
    conv = nn.Conv2d if len(stride) == 2 else nn.Conv3d
    assert all(isinstance(c, conv) for c in convs(head)) and head.ndim == len(stride)


def test_decoder_has_one_stage_per_halving_of_the_largest_stride():
    assert len(upsamplings(SegmentationHead(64, 2, (16, 16)))) == 4
    assert len(upsamplings(SegmentationHead(64, 2, (14, 14)))) == 4  # ceil(log2 14)
    assert len(upsamplings(SegmentationHead(64, 2, (32, 32)))) == 5
    assert upsamplings(SegmentationHead(64, 2, (1, 1))) == []
    # an axis already at full resolution is not upsampled
    assert upsamplings(SegmentationHead(64, 2, (2, 8, 8))) == [
        (2.0, 2.0, 2.0),
        (1.0, 2.0, 2.0),
        (1.0, 2.0, 2.0),
    ]
    assert upsamplings(SegmentationHead(64, 2, (16, 16), "linear")) == []


def test_decoder_intermediate_map_reaches_the_input_resolution():
    head = SegmentationHead(32, 2, (16, 16))
    features = torch.randn(1, 32, 14, 14)
    assert head.layers[:-1](features).shape[2:] == (224, 224)


def test_linear_head_is_one_1x1_convolution():
    head = SegmentationHead(384, 4, (14, 14), "linear")
    assert n_params(head) == 384 * 4 + 4
    assert head(torch.zeros(1, 384, 16, 16), (224, 224)).shape == (1, 4, 224, 224)
    head3d = SegmentationHead(32, 3, (4, 4, 4), "linear")
    assert n_params(head3d) == 32 * 3 + 3


def test_decoder_widths_and_parameter_count():
    head = SegmentationHead(256, 3, (16, 16))
    assert [c.out_channels for c in convs(head)] == [128, 64, 32, 16, 16, 3]
    gn = [m.num_groups for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert gn == [8, 8, 8, 8]
    expected = (
        (256 * 128 + 128)  # 1x1 reduction
        + (128 * 64 * 9 + 2 * 64)  # 3x3 conv without bias + GroupNorm affine
        + (64 * 32 * 9 + 2 * 32)
        + (32 * 16 * 9 + 2 * 16)
        + (16 * 16 * 9 + 2 * 16)
        + (16 * 3 + 3)  # classifier
    )
    assert n_params(head) == expected


def test_narrow_features_never_widen_and_groups_divide_the_channels():
    narrow = SegmentationHead(8, 2, (8, 8))
    assert [c.out_channels for c in convs(narrow)] == [8, 8, 8, 8, 2]
    odd = SegmentationHead(100, 2, (4, 4))
    assert [c.out_channels for c in convs(odd)] == [100, 50, 25, 2]
    for gn in (m for m in odd.modules() if isinstance(m, nn.GroupNorm)):
        assert gn.num_channels % gn.num_groups == 0
    assert odd(torch.randn(1, 100, 5, 5), (20, 20)).shape == (1, 2, 20, 20)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_gradients_reach_every_parameter_and_the_features(kind):
    head = SegmentationHead(16, 3, (8, 8, 8), kind)
    features = torch.randn(2, 16, 2, 2, 2, requires_grad=True)
    head(features, (16, 16, 16)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_decoder_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    head = SegmentationHead(32, 2, (8, 8)).train()
    features = torch.randn(3, 32, 4, 4)
    alone = head(features[:1], (32, 32))
    torch.testing.assert_close(head(features, (32, 32))[:1], alone)


@pytest.mark.parametrize(("kind", "ndim"), [("linear", 2), ("decoder", 2), ("decoder", 3)])
def test_a_small_head_fits_a_fixed_feature_map(kind, ndim):
    torch.manual_seed(0)
    grid, stride = (4,) * ndim, (4,) * ndim
    size = tuple(g * s for g, s in zip(grid, stride, strict=True))
    features = torch.randn(2, 8, *grid)
    # classes that the (upsampled) features determine: the head can learn them
    target = F.interpolate(features[:, :3], size=size, mode="nearest").argmax(1)
    head = SegmentationHead(8, 3, stride, kind)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(head(features, size), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_unknown_kind_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'linaer'.*Did you mean 'linear'"):
        SegmentationHead(8, 2, (16, 16), "linaer")
    with pytest.raises(ConfigError, match="decoder"):
        SegmentationHead(8, 2, (16, 16), "unet")


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(ConfigError, match="stride must be 2 or 3"):
        SegmentationHead(8, 2, (16,))
    with pytest.raises(ConfigError, match="stride must be 2 or 3"):
        SegmentationHead(8, 2, (0, 16))
    with pytest.raises(ConfigError, match="num_classes must be positive"):
        SegmentationHead(8, 0, (16, 16))
    head = SegmentationHead(8, 2, (16, 16))
    with pytest.raises(DataError, match=r"2D segmentation head takes features \(B, 8, h, w\)"):
        head(torch.randn(1, 8, 2, 2, 2), (32, 32))
    with pytest.raises(DataError, match=r"\(B, 8, h, w\).*\(1, 4, 2, 2\)"):
        head(torch.randn(1, 4, 2, 2), (32, 32))
    with pytest.raises(DataError, match="needs 2 values"):
        head(torch.randn(1, 8, 2, 2), (32, 32, 32))
