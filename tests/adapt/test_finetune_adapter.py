"""Bottleneck adapters: placement, zero initialisation, capped width, live hooks."""

import copy

import pytest
import timm
import torch
from torch import nn

from clinadapt.adapt import AdaptedModel, create_method
from clinadapt.backbones import Backbone, PretrainedConfig, create_backbone
from clinadapt.errors import ClinadaptError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def adapt(backbone, options=None):
    method = create_method("adapter", options)
    return method.apply(AdaptedModel(backbone, 3)).eval(), method


def tiny_swin() -> Backbone:
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=0,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=4,
        img_size=32,
    )
    return Backbone("swin", swin.eval().requires_grad_(False), 32, PretrainedConfig(32), "x", False)


def tiny_open_clip() -> Backbone:
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    tower = VisionTransformer(32, 16, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    return Backbone(
        "clip", tower.eval().requires_grad_(False), 16, PretrainedConfig(32), "x", False
    )


@pytest.mark.parametrize("make", ["test_vit", "test_cnn", tiny_swin, tiny_open_clip])
@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_zero_initialised_adapters_leave_the_backbone_unchanged(make, style):
    torch.manual_seed(0)
    backbone = create_backbone(make, "none") if isinstance(make, str) else make()
    frozen = copy.deepcopy(backbone.model)
    model, method = adapt(backbone, {"style": style})
    assert method.selected()["num_adapters"] > 0
    with torch.no_grad():
        torch.testing.assert_close(model(X), model.head(frozen(X)), rtol=0, atol=0)
        for name, p in model.named_parameters():
            if ".adapters." in name and ".up." in name:
                p.normal_()  # the hooks are live: non-zero adapters change the output
        assert not torch.allclose(model(X), model.head(frozen(X)), atol=1e-4)


def test_one_adapter_per_transformer_block_with_capped_width():
    model, method = adapt(create_backbone("test_vit", "none"), {"bottleneck": 16})
    assert method.sites == [f"blocks.{i}.mlp" for i in range(6)]
    adapters = model.backbone.model.adapters
    assert [a.down.out_features for a in adapters.values()] == [16] * 6
    assert model.trainable_parameters() == 6 * (64 * 16 + 16 + 16 * 64 + 64) + 64 * 3 + 3
    wide, _ = adapt(create_backbone("test_vit", "none"), {"bottleneck": 1000})
    assert {a.down.out_features for a in wide.backbone.model.adapters.values()} == {64}
    # the timm tree is untouched: the frozen weights still load by their original names
    fresh = timm.create_model("test_vit", num_classes=0, img_size=32)
    state = {k: v for k, v in model.backbone.model.state_dict().items() if "adapters" not in k}
    fresh.load_state_dict(state)


def test_cnn_stages_get_residual_conv_adapters():
    model, method = adapt(create_backbone("test_cnn", "none"))
    assert method.sites == ["layer1", "layer2", "layer3", "layer4"]  # stem activation skipped
    widths = [
        (a.down.in_channels, a.down.out_channels) for a in model.backbone.model.adapters.values()
    ]
    assert widths == [(32, 32), (48, 48), (192, 64), (96, 64)]


def test_copies_are_independent():
    model, _ = adapt(create_backbone("test_vit", "none"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.backbone.model.adapters.parameters():
            p.normal_()
        assert not torch.allclose(twin(X), model(X), atol=1e-4)
        before = model(X)
        torch.testing.assert_close(model(X), before, rtol=0, atol=0)
        for p in model.backbone.model.adapters.parameters():
            p.copy_(twin.get_parameter(f"backbone.model.adapters.{_name(model, p)}"))
        torch.testing.assert_close(model(X), twin(X), rtol=0, atol=0)


def _name(model, param):
    return next(n for n, p in model.backbone.model.adapters.named_parameters() if p is param)


def test_merge_is_refused_with_a_reason():
    model, method = adapt(create_backbone("test_cnn", "none"))
    with pytest.raises(ClinadaptError, match="cannot be folded.*without --merge"):
        method.merge(model)


def test_models_without_blocks_or_stages_are_refused():
    bare = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone = Backbone("bare", bare.requires_grad_(False), 4, PretrainedConfig(32), "x", False)
    with pytest.raises(ClinadaptError, match="'bare'.*neither transformer blocks"):
        adapt(backbone)
