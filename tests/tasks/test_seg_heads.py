"""Segmentation heads: exact output sizes in 2D and 3D, the decoder's stages and widths, parameter
counts, gradients, batch-size independence, a head that fits, skip connections from finer maps
(which stage takes which map, that they matter, that one map gives the head without skips), and
clear errors."""

from __future__ import annotations

import math

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
    head = SegmentationHead([24], 3, [stride], kind)
    out = head([torch.randn(2, 24, *grid)], size)
    assert out.shape == (2, 3, *size)
    conv = nn.Conv2d if len(stride) == 2 else nn.Conv3d
    assert all(isinstance(c, conv) for c in convs(head)) and head.ndim == len(stride)


def test_decoder_has_one_stage_per_halving_of_the_largest_stride():
    assert len(upsamplings(SegmentationHead([64], 2, [(16, 16)]))) == 4
    assert len(upsamplings(SegmentationHead([64], 2, [(14, 14)]))) == 4  # ceil(log2 14)
    assert len(upsamplings(SegmentationHead([64], 2, [(32, 32)]))) == 5
    assert upsamplings(SegmentationHead([64], 2, [(1, 1)])) == []
    # an axis already at full resolution is not upsampled
    assert upsamplings(SegmentationHead([64], 2, [(2, 8, 8)])) == [
        (2.0, 2.0, 2.0),
        (1.0, 2.0, 2.0),
        (1.0, 2.0, 2.0),
    ]
    assert upsamplings(SegmentationHead([64], 2, [(16, 16)], "linear")) == []


def test_decoder_intermediate_map_reaches_the_input_resolution():
    head = SegmentationHead([32], 2, [(16, 16)])
    features = torch.randn(1, 32, 14, 14)
    assert head.layers[:-1](features).shape[2:] == (224, 224)


def test_linear_head_is_one_1x1_convolution():
    head = SegmentationHead([384], 4, [(14, 14)], "linear")
    assert n_params(head) == 384 * 4 + 4
    assert head([torch.zeros(1, 384, 16, 16)], (224, 224)).shape == (1, 4, 224, 224)
    head3d = SegmentationHead([32], 3, [(4, 4, 4)], "linear")
    assert n_params(head3d) == 32 * 3 + 3


def test_decoder_widths_and_parameter_count():
    head = SegmentationHead([256], 3, [(16, 16)])
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
    narrow = SegmentationHead([8], 2, [(8, 8)])
    assert [c.out_channels for c in convs(narrow)] == [8, 8, 8, 8, 2]
    odd = SegmentationHead([100], 2, [(4, 4)])
    assert [c.out_channels for c in convs(odd)] == [100, 50, 25, 2]
    for gn in (m for m in odd.modules() if isinstance(m, nn.GroupNorm)):
        assert gn.num_channels % gn.num_groups == 0
    assert odd([torch.randn(1, 100, 5, 5)], (20, 20)).shape == (1, 2, 20, 20)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_gradients_reach_every_parameter_and_the_features(kind):
    head = SegmentationHead([16], 3, [(8, 8, 8)], kind)
    features = torch.randn(2, 16, 2, 2, 2, requires_grad=True)
    head([features], (16, 16, 16)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_decoder_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    head = SegmentationHead([32], 2, [(8, 8)]).train()
    features = torch.randn(3, 32, 4, 4)
    alone = head([features[:1]], (32, 32))
    torch.testing.assert_close(head([features], (32, 32))[:1], alone)


@pytest.mark.parametrize(("kind", "ndim"), [("linear", 2), ("decoder", 2), ("decoder", 3)])
def test_a_small_head_fits_a_fixed_feature_map(kind, ndim):
    torch.manual_seed(0)
    grid, stride = (4,) * ndim, (4,) * ndim
    size = tuple(g * s for g, s in zip(grid, stride, strict=True))
    features = torch.randn(2, 8, *grid)
    # classes that the (upsampled) features determine: the head can learn them
    target = F.interpolate(features[:, :3], size=size, mode="nearest").argmax(1)
    head = SegmentationHead([8], 3, [stride], kind)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(head([features], size), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_unknown_kind_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'linaer'.*Did you mean 'linear'"):
        SegmentationHead([8], 2, [(16, 16)], "linaer")
    with pytest.raises(ConfigError, match="decoder"):
        SegmentationHead([8], 2, [(16, 16)], "unet")


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(ConfigError, match="stride must be 2 or 3"):
        SegmentationHead([8], 2, [(16,)])
    with pytest.raises(ConfigError, match="stride must be 2 or 3"):
        SegmentationHead([8], 2, [(0, 16)])
    with pytest.raises(ConfigError, match="num_classes must be positive"):
        SegmentationHead([8], 0, [(16, 16)])
    head = SegmentationHead([8], 2, [(16, 16)])
    with pytest.raises(DataError, match=r"2D segmentation head takes features \(B, 8, h, w\)"):
        head([torch.randn(1, 8, 2, 2, 2)], (32, 32))
    with pytest.raises(DataError, match=r"\(B, 8, h, w\).*\(1, 4, 2, 2\)"):
        head([torch.randn(1, 4, 2, 2)], (32, 32))
    with pytest.raises(DataError, match="needs 2 values"):
        head([torch.randn(1, 8, 2, 2)], (32, 32, 32))


class SingleMapHead(nn.Module):
    """The decoder before skip connections, verbatim (errors aside): runs already measured with
    it rely on the one-map head being this module, parameter for parameter."""

    def __init__(self, in_channels, num_classes, stride, kind="decoder"):
        super().__init__()
        self.ndim = len(stride)
        self.mode = "bilinear" if self.ndim == 2 else "trilinear"
        conv = nn.Conv2d if self.ndim == 2 else nn.Conv3d
        layers = []
        width = in_channels
        if kind == "decoder":
            width = min(in_channels, 128)
            layers.append(conv(in_channels, width, 1))
            doublings = [math.ceil(math.log2(s)) for s in stride]
            for stage in range(max(doublings)):
                out = max(width // 2, min(width, 16))
                scale = tuple(2.0 if stage < d else 1.0 for d in doublings)
                layers += [
                    nn.Upsample(scale_factor=scale, mode=self.mode, align_corners=False),
                    conv(width, out, 3, padding=1, bias=False),
                    nn.GroupNorm(math.gcd(out, 8), out),
                    nn.ReLU(inplace=True),
                ]
                width = out
        layers.append(conv(width, num_classes, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features, size):
        logits = self.layers(features)
        if tuple(logits.shape[2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode=self.mode, align_corners=False)
        return logits


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize(
    ("channels", "stride", "grid", "size"),
    [
        (256, (16, 16), (4, 4), (64, 64)),
        (1280, (32, 32), (3, 4), (101, 127)),
        (100, (14, 14), (4, 4), (56, 56)),
        (24, (2, 8, 8), (3, 2, 2), (6, 16, 16)),
        (8, (1, 1), (9, 11), (9, 11)),
    ],
)
def test_one_map_head_is_the_head_without_skips(kind, channels, stride, grid, size):
    torch.manual_seed(3)
    old = SingleMapHead(channels, 3, stride, kind)
    torch.manual_seed(3)
    new = SegmentationHead([channels], 3, [stride], kind)
    reference, state = old.state_dict(), new.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in old.named_parameters()]
    features = torch.randn(2, channels, *grid)
    for mode in (True, False):
        old.train(mode)
        new.train(mode)
        torch.testing.assert_close(new([features], size), old(features, size), rtol=0, atol=0)


MOBILENET = ((16, 24, 32, 96, 1280), ((2, 2), (4, 4), (8, 8), (16, 16), (32, 32)))


@pytest.mark.parametrize(
    ("channels", "strides", "grids", "size", "skips"),
    [
        # MobileNetV2's five stages at 128 px
        (
            *MOBILENET,
            [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)],
            (128, 128),
            {0: 3, 1: 2, 2: 1, 3: 0},
        ),
        # odd input: timm's padded stages round up, the decoder follows their grids
        (
            *MOBILENET,
            [(51, 51), (26, 26), (13, 13), (7, 7), (4, 4)],
            (101, 101),
            {0: 3, 1: 2, 2: 1, 3: 0},
        ),
        # not powers of two: 28 px through stride-2 stages (14, 7, 4, 2, 1 cells)
        (
            (8, 8, 16, 16, 32),
            ((2, 2), (4, 4), (7, 7), (14, 14), (28, 28)),
            [(14, 14), (7, 7), (4, 4), (2, 2), (1, 1)],
            (28, 28),
            {0: 3, 1: 2, 2: 1, 3: 0},
        ),
        (
            (8, 16, 32),
            ((2, 2, 2), (4, 4, 4), (8, 8, 8)),
            [(8, 8, 8), (4, 4, 4), (2, 2, 2)],
            (16, 16, 16),
            {0: 1, 1: 0},
        ),
        # anisotropic volume: only the in-plane axes double after the first stage
        (
            (8, 16, 32),
            ((1, 2, 2), (1, 4, 4), (2, 8, 8)),
            [(6, 16, 16), (6, 8, 8), (3, 4, 4)],
            (6, 32, 32),
            {0: 1, 1: 0},
        ),
    ],
)
def test_finer_maps_join_the_stage_that_reaches_their_stride(channels, strides, grids, size, skips):
    head = SegmentationHead(channels, 2, strides)
    assert head.skip_levels == skips
    levels = [torch.randn(2, c, *g) for c, g in zip(channels, grids, strict=True)]
    assert head(levels, size).shape == (2, 2, *size)
    linear = SegmentationHead(channels, 2, strides, "linear")
    assert n_params(linear) == channels[-1] * 2 + 2  # the coarsest map only
    assert linear(levels, size).shape == (2, 2, *size)


def test_skip_widths_never_exceed_the_stage_and_widen_its_convolution():
    head = SegmentationHead(*MOBILENET[:1], 2, MOBILENET[1])
    projections = [s[0] for s in head.skips.values()]
    assert [(p.in_channels, p.out_channels) for p in projections] == [
        (96, 64),
        (32, 32),
        (24, 16),
        (16, 16),
    ]
    stage_convs = [m for m in head.layers if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [(c.in_channels, c.out_channels) for c in stage_convs] == [
        (128 + 64, 64),
        (64 + 32, 32),
        (32 + 16, 16),
        (16 + 16, 16),
        (16, 16),  # stride 1: no map that fine
    ]


def test_output_depends_on_every_joined_map_and_on_no_other():
    torch.manual_seed(0)
    # map 0 (stride 4 along one axis, 16 along the other) and map 1 (the coarsest's stride)
    # are never reached; map 2 joins the first stage
    channels, strides = (8, 8, 8, 16), ((4, 16), (16, 16), (8, 8), (16, 16))
    head = SegmentationHead(channels, 2, strides).eval()
    assert head.skip_levels == {0: 2}
    grids = [(8, 2), (2, 2), (4, 4), (2, 2)]
    levels = [torch.randn(1, c, *g) for c, g in zip(channels, grids, strict=True)]
    base = head(levels, (32, 32))
    for i in range(len(levels)):
        changed = [t + 1.0 if j == i else t for j, t in enumerate(levels)]
        moved = not torch.allclose(head(changed, (32, 32)), base)
        assert moved == (i in (2, 3)), i
    torch.manual_seed(5)
    alone = SegmentationHead([16], 2, [(16, 16)])
    torch.manual_seed(5)
    ignoring = SegmentationHead((8, 8, 16), 2, ((4, 16), (16, 16), (16, 16)))
    assert ignoring.skip_levels == {}
    assert list(ignoring.state_dict()) == list(alone.state_dict())


def test_gradients_reach_every_joined_map():
    head = SegmentationHead((4, 8, 16), 2, ((1, 1, 1), (2, 2, 2), (4, 4, 4)))
    levels = [
        torch.randn(1, c, *[8 // 2**i] * 3, requires_grad=True) for i, c in enumerate((4, 8, 16))
    ]
    head(levels, (8, 8, 8)).square().mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in levels)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def fit(head: SegmentationHead, levels, target, steps=60) -> float:
    optimiser = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(steps):
        loss = F.cross_entropy(head(levels, target.shape[1:]), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return loss.item()


def test_skips_place_what_the_coarse_map_cannot():
    torch.manual_seed(0)
    fine = torch.randn(2, 4, 16, 16)  # stride 2
    coarse = torch.randn(2, 8, 2, 2)  # stride 16: knows nothing of the fine pattern
    target = F.interpolate(fine[:, :2], scale_factor=2, mode="nearest").argmax(1)
    torch.manual_seed(1)
    with_skips = fit(SegmentationHead((4, 8), 2, ((2, 2), (16, 16))), [fine, coarse], target)
    torch.manual_seed(1)
    without = fit(SegmentationHead([8], 2, [(16, 16)]), [coarse], target)
    assert with_skips < 0.5 * without


def test_maps_that_disagree_with_the_head_are_clear_errors():
    with pytest.raises(ConfigError, match="one stride per feature map"):
        SegmentationHead((8, 16), 2, [(16, 16)])
    with pytest.raises(ConfigError, match="the same number for every map"):
        SegmentationHead((8, 16), 2, [(2, 2, 2), (16, 16)])
    head = SegmentationHead((8, 16), 2, [(4, 4), (16, 16)])
    with pytest.raises(DataError, match="takes 2 feature maps"):
        head([torch.randn(1, 16, 2, 2)], (32, 32))
    with pytest.raises(DataError, match=r"\(B, 8, h, w\) as map 0.*\(1, 4, 8, 8\)"):
        head([torch.randn(1, 4, 8, 8), torch.randn(1, 16, 2, 2)], (32, 32))
