"""``Backbone.dense``: spatial feature maps for segmentation heads, from every kind of backbone
(timm CNNs and ViTs, Swin, open_clip's ViT tower, clinadapt's 2D/3D ResNets and 3D ViT)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from clinadapt.backbones import BACKBONES, create_backbone, get_spec
from clinadapt.backbones.base import Backbone, PretrainedConfig
from clinadapt.errors import ClinadaptError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [n for n in BACKBONES.names() if get_spec(n).tiny]
NAMES = [*TINY, "vit_t_28", "resnet18_28", "resnet18_3d"]
CNNS = [n for n in NAMES if get_spec(n).family == "cnn"]
VITS = [n for n in NAMES if get_spec(n).family == "vit"]


def batch(backbone: Backbone, size: int | None = None, n: int = 2) -> torch.Tensor:
    cfg = backbone.pretrained_cfg
    torch.manual_seed(1)
    return torch.randn(n, cfg.channels, *[size or cfg.input_size] * backbone.ndim)


@pytest.fixture(scope="module")
def built() -> dict[str, Backbone]:
    return {name: create_backbone(name, "none") for name in NAMES}


def test_every_tiny_backbone_is_covered():
    assert {"test_cnn", "test_vit", "test_resnet3d", "test_vit3d"} <= set(TINY)
    assert CNNS and VITS


@pytest.mark.parametrize("name", NAMES)
def test_map_shape_follows_declared_width_and_stride(built, name):
    backbone = built[name]
    x = batch(backbone)
    out = backbone.dense(x)
    grid = tuple(backbone.pretrained_cfg.input_size // s for s in backbone.dense_stride)
    assert out.shape == (2, backbone.dense_dim, *grid)
    assert out.ndim == 2 + get_spec(name).ndim and len(backbone.dense_stride) == backbone.ndim
    assert not out.requires_grad and not backbone.training


@pytest.mark.parametrize(
    ("name", "dim", "stride"),
    [
        ("test_cnn", 96, (32, 32)),
        ("test_vit", 64, (16, 16)),
        ("vit_t_28", 192, (4, 4)),
        ("resnet18_28", 512, (7, 7)),  # 28 -> 28, 14, 7, 4: three stride-2 stages, padded
        ("resnet18_3d", 512, (7, 7, 7)),
        ("test_vit3d", 32, (4, 4, 4)),
    ],
)
def test_known_geometry(built, name, dim, stride):
    assert (built[name].dense_dim, built[name].dense_stride) == (dim, stride)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_map_averages_to_the_embedding(built, name):
    backbone = built[name]
    size = backbone.pretrained_cfg.input_size
    if min(size // s for s in backbone.dense_stride) == 1:  # test_cnn: make the map wider than 1
        size *= 2
    x = batch(backbone, size)
    dense = backbone.dense(x)
    assert min(dense.shape[2:]) > 1
    torch.testing.assert_close(dense.flatten(2).mean(-1), backbone.embed(x))


def test_timm_mobilenet_map_is_the_head_convolution_output():
    backbone = create_backbone("mobilenetv2_100", "none")
    x = batch(backbone, 64)
    dense = backbone.dense(x)
    assert dense.shape == (2, 1280, 2, 2) and backbone.dense_stride == (32, 32)
    torch.testing.assert_close(dense.mean((2, 3)), backbone.embed(x))


@pytest.mark.parametrize("name", VITS)
def test_vit_map_holds_the_patch_tokens_of_forward_features(built, name):
    backbone = built[name]
    x = batch(backbone)
    model = backbone.model
    tokens = model.forward_features(x)[:, model.num_prefix_tokens :]
    dense = backbone.dense(x)
    assert tokens.shape[1] == dense[0, 0].numel()
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), tokens)
    # raster order: the second token is the neighbour along the last axis
    torch.testing.assert_close(dense[(0, slice(None), *[0] * (dense.ndim - 3), 1)], tokens[0, 1])


def test_vit_with_registers_and_dynamic_size_reads_the_grid_from_the_input():
    vit = timm.create_model(
        "test_vit", num_classes=0, img_size=32, reg_tokens=2, dynamic_img_size=True
    )
    backbone = Backbone("vit", vit.eval(), 64, PretrainedConfig(32), "x", False)
    x = torch.randn(1, 3, 48, 64)
    dense = backbone.dense(x)
    assert vit.num_prefix_tokens == 3 and dense.shape == (1, 64, 3, 4)
    tokens = vit.forward_features(x)[:, 3:]
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), tokens)
    assert backbone.dense_stride == (16, 16)


def test_swin_channels_last_map_is_made_channels_first(tiny_swin):
    backbone = Backbone("swin", tiny_swin.eval(), 32, PretrainedConfig(32), "x", False)
    x = torch.randn(2, 3, 32, 32)
    dense = backbone.dense(x)
    assert dense.shape == (2, 32, 4, 4) and backbone.dense_stride == (8, 8)
    torch.testing.assert_close(dense.mean((2, 3)), backbone.embed(x))


def test_open_clip_vit_tower_gives_its_normed_patch_tokens():
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(32, 16, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    backbone = Backbone("clip", tower.eval(), 16, PretrainedConfig(32), "x", False)
    x = torch.randn(2, 3, 32, 32)
    dense = backbone.dense(x)
    assert dense.shape == (2, 32, 2, 2) and backbone.dense_dim == 32  # width, not output_dim
    assert len(backbone.dense_levels(x)) == 1
    tower.output_tokens = True
    _, tokens = tower(x)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), tokens)


def test_geometry_probe_leaves_a_training_model_untouched():
    backbone = create_backbone("test_cnn", "none")
    backbone.model.train()
    stats = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    assert backbone.dense_dim == 96
    assert backbone.model.training
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, stats[key]), key


def test_dense_keeps_gradients_when_the_caller_wants_them():
    backbone = create_backbone("test_vit", "none")
    backbone.model.requires_grad_(True)
    out = backbone.dense(batch(backbone))
    out.sum().backward()
    assert backbone.model.patch_embed.proj.weight.grad is not None


def test_model_without_a_map_is_refused_by_name():
    flat = nn.Sequential(nn.Flatten(), nn.LazyLinear(8))
    backbone = Backbone("flatnet", flat, 8, PretrainedConfig(4), "x", False)
    with pytest.raises(ClinadaptError, match="dense features are not available for flatnet"):
        backbone.dense(torch.randn(1, 3, 4, 4))


def timm_backbone(name: str, size: int = 32, **kwargs) -> Backbone:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, **kwargs).eval()
    return Backbone(name, model, model.num_features, PretrainedConfig(size), "x", False)


def assert_levels_end_in_dense(backbone: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    levels = backbone.dense_levels(x)
    assert torch.equal(levels[-1], backbone.dense(x))
    assert backbone.dense_level_dims == tuple(t.shape[1] for t in levels)
    assert backbone.dense_level_dims[-1] == backbone.dense_dim
    assert backbone.dense_level_strides[-1] == backbone.dense_stride
    return levels


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("test_resnet", (32, 32, 48, 192, 96)),
        ("test_convnext", (24, 32, 48, 64)),
        # MobileNets and EfficientNets: the last stage's grid holds forward_features' head conv
        ("test_efficientnet", (16, 24, 32, 48, 256)),
        ("mobilenetv2_100", (16, 24, 32, 96, 1280)),
    ],
)
def test_timm_cnn_levels_are_its_stages_fine_to_coarse_ending_in_dense(name, dims):
    backbone = timm_backbone(name, 64)
    levels = assert_levels_end_in_dense(backbone, batch(backbone))
    assert backbone.dense_level_dims == dims
    first = 64 // levels[0].shape[-1]
    strides = [first * 2**i for i in range(len(dims))]
    assert backbone.dense_level_strides == tuple((s, s) for s in strides)
    for level, stride in zip(levels, strides, strict=True):
        assert level.shape[2:] == (64 // stride, 64 // stride)


def test_swin_levels_are_channels_first_and_end_in_the_normed_map(tiny_swin):
    backbone = Backbone("swin", tiny_swin.eval(), 32, PretrainedConfig(32), "x", False)
    assert_levels_end_in_dense(backbone, torch.randn(2, 3, 32, 32))
    assert backbone.dense_level_dims == (16, 32)
    assert backbone.dense_level_strides == ((4, 4), (8, 8))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "test_cnn"])
def test_token_models_and_own_nets_give_one_level(built, name):
    backbone = built[name]
    x = batch(backbone)
    assert len(assert_levels_end_in_dense(backbone, x)) == 1
    assert backbone.dense_level_strides == (backbone.dense_stride,)


def test_one_probe_measures_every_level():
    backbone = create_backbone("test_cnn", "none")
    calls = []
    backbone.model.conv1.register_forward_hook(lambda *_: calls.append(1))
    assert backbone.dense_level_dims == (32, 32, 48, 192, 96)
    assert backbone.dense_stride == (32, 32) and backbone.dense_dim == 96
    assert backbone.dense_level_strides == tuple((s, s) for s in (2, 4, 8, 16, 32))
    assert len(calls) == 1


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit"])
def test_levels_run_the_layers_a_method_adds(method):
    from clinadapt.adapt import AdaptedModel, create_method

    base = create_backbone("test_cnn", "none")
    torch.manual_seed(0)
    model = AdaptedModel(copy.deepcopy(base), 2, task="segmentation")
    model = create_method(method).apply(model)
    added = [p for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert added
    with torch.no_grad():  # move the zero-initialised updates away from the identity
        for p in added:
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    x = batch(base, 64)
    with torch.no_grad():
        levels = assert_levels_end_in_dense(model.backbone, x)
        before = base.dense_levels(x)
    assert len(levels) == 5
    assert not torch.allclose(levels[-1], before[-1])
    assert not torch.allclose(levels[1], before[1])  # a fine stage feels the method too
    model.train()
    model(x).square().mean().backward()
    # every added layer is in the graph (timm zero-inits the last norm of a residual branch, so
    # some receive zeros at initialisation)
    assert all(p.grad is not None for p in added)
    assert any(p.grad.abs().sum() > 0 for p in added)
