"""clinadapt's own MedMNIST v2 ResNets: 2D / 2.5D / 3D shapes and kernels, the registry and the
factory (random init only, clear error for pretrained, local safetensors)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clinadapt.backbones import BACKBONES, create_backbone, get_spec, pretrained_config
from clinadapt.backbones.medmnist_nets import MODELS, BasicBlock, ResNet, create_model, input_config
from clinadapt.errors import ClinadaptError, ConfigError, DataError, UnknownNameError

OURS = [n for n in BACKBONES if BACKBONES.get(n).library == "clinadapt"]
RESNETS = [n for n in OURS if MODELS[n].arch == "resnet"]  # others: test_vit3d.py, test_unet.py
TINY = {"layers": [1, 1, 1, 1], "widths": (4, 8, 8, 16)}


def tiny(mode: str = "3d", **kw) -> ResNet:
    dims = 2 if mode == "2d" else 3
    return ResNet(BasicBlock, in_channels=1, spatial_dims=dims, conv_mode=mode, **TINY, **kw)


def convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]


def test_registered_names():
    assert {"resnet18_28", "resnet18_2_5d", "resnet18_3d", "test_resnet3d"} == set(RESNETS)
    assert BACKBONES.get("test_resnet3d").tiny
    for name in OURS:
        spec = get_spec(name)
        assert spec.ndim == input_config(spec.model_name)["ndim"]
        assert spec.weights_ref == f"clinadapt:{spec.model_name}"
    assert [get_spec(n).ndim for n in sorted(RESNETS)] == [2, 3, 3, 3]
    assert get_spec("resnet18").ndim == 2  # timm specs keep the default


@pytest.mark.parametrize(
    ("name", "mode", "kernel", "channels", "mean"),
    [
        ("resnet18_28", "2d", (3, 3), 3, 0.5),
        ("resnet18_2_5d", "2.5d", (1, 3, 3), 1, 0.0),
        ("resnet18_3d", "3d", (3, 3, 3), 1, 0.0),
    ],
)
def test_medmnist_v2_resnet18(name, mode, kernel, channels, mean):
    model = create_model(name, num_classes=0).eval()
    assert model.conv_mode == mode and model.num_features == 512
    assert model.conv1.kernel_size == kernel and model.conv1.stride == (1,) * len(kernel)
    assert isinstance(model.maxpool, nn.Identity)  # cifar stem: no max-pool
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    if mode == "2d":  # the MedMNIST v2 / CIFAR ResNet-18 (+ 5130 for a 10-class head)
        assert sum(p.numel() for p in model.parameters()) == 11_168_832
    cfg = pretrained_config(get_spec(name))
    assert (cfg.input_size, cfg.channels, cfg.mean, cfg.std) == (
        28,
        channels,
        (mean,) * channels,
        ((0.5 if mean else 1.0),) * channels,
    )
    size = 28 if mode == "2d" else 8  # a small volume: full-width 3D nets are slow on CPU
    x = torch.randn((2, channels) + (size,) * (2 if mode == "2d" else 3))
    with torch.inference_mode():
        assert model(x).shape == (2, 512)


def test_2_5d_kernels_have_depth_1_and_stride_all_axes_like_acsconv():
    model = create_model("resnet18_2_5d")
    for conv in convs(model):
        assert isinstance(conv, nn.Conv3d)
        assert conv.kernel_size[0] == 1 and conv.padding[0] == 0
        assert conv.stride in ((1, 1, 1), (2, 2, 2))
    assert all(isinstance(m, nn.BatchNorm3d) for m in model.modules() if "Norm" in type(m).__name__)


def test_3d_kernels_are_cubic_and_inflated():
    model = create_model("resnet18_3d")
    for conv in convs(model):
        k = conv.kernel_size
        assert isinstance(conv, nn.Conv3d) and k[0] == k[1] == k[2]
        assert conv.padding == (k[0] // 2,) * 3
    w = model.layer2[0].conv1.weight  # i3d: the same 2D kernel / 3 at every depth
    assert torch.equal(w[:, :, 0], w[:, :, 1]) and torch.equal(w[:, :, 1], w[:, :, 2])
    assert not torch.equal(w[0], w[1])
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool3d)
    plain = tiny("3d")  # without inflation: PyTorch's default Conv3d init
    w = plain.layer1[0].conv1.weight
    assert not torch.equal(w[:, :, 0], w[:, :, 1])


def test_2_5d_on_a_single_slice_equals_2d_with_the_same_kernels():
    """ACSConv's Conv2_5dConverter loads 2D weights with unsqueeze(-3); so do we."""
    flat, deep = tiny("2d").eval(), tiny("2.5d").eval()
    state = {k: v.unsqueeze(2) if v.ndim == 4 else v for k, v in flat.state_dict().items()}
    deep.load_state_dict(state)
    x = torch.randn(2, 1, 12, 12)
    with torch.inference_mode():
        torch.testing.assert_close(deep(x[:, :, None]), flat(x))


@pytest.mark.parametrize("mode", ["2d", "2.5d", "3d"])
def test_tiny_forward_backward_and_classifier(mode):
    model = tiny(mode, num_classes=3).train()
    x = torch.randn((2, 1) + (16,) * (2 if mode == "2d" else 3))
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 16)
    model.reset_classifier(0)
    assert model(x).shape == (2, 16) and isinstance(model.get_classifier(), nn.Identity)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny("3d", num_classes=2).eval()  # eval: BatchNorm statistics stay fixed
    x = torch.randn(2, 1, 8, 8, 8)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)


def test_imagenet_stem_and_bottleneck():
    from clinadapt.backbones.medmnist_nets import Bottleneck

    model = ResNet(Bottleneck, [1, 1, 1, 1], 1, 3, "2.5d", "imagenet", widths=(4, 4, 8, 8)).eval()
    assert model.conv1.kernel_size == (1, 7, 7) and model.conv1.stride == (2, 2, 2)
    assert isinstance(model.maxpool, nn.MaxPool3d) and model.num_features == 32
    assert model(torch.randn(1, 1, 16, 32, 32)).shape == (1, 32)


def test_wrong_input_shapes_and_arguments_are_clear():
    with pytest.raises(DataError, match=r"\(B, C, D, H, W\).*VolumePreprocess"):
        tiny("3d")(torch.randn(2, 1, 16, 16))
    with pytest.raises(DataError, match="C=1"):
        tiny("3d")(torch.randn(2, 3, 8, 8, 8))
    with pytest.raises(ConfigError, match="does not fit"):
        ResNet(BasicBlock, [2, 2, 2, 2], spatial_dims=2, conv_mode="3d")
    with pytest.raises(ConfigError, match="Did you mean '2.5d'"):
        ResNet(BasicBlock, [2, 2, 2, 2], spatial_dims=3, conv_mode="2_5d")
    with pytest.raises(UnknownNameError, match="resnet18_3d"):
        create_model("resnet18_3dd")


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_create_backbone_with_random_weights(name):
    backbone = create_backbone(name, weights="none")
    spec = get_spec(name)
    assert backbone.feature_dim == (32 if spec.tiny else 512)
    assert backbone.model.spatial_dims == spec.ndim
    assert backbone.weights_id == "none-seed0" and not backbone.is_pretrained
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training
    cfg = backbone.pretrained_cfg
    size = cfg.input_size if spec.tiny or spec.ndim == 2 else 8
    with torch.inference_mode():
        out = backbone.embed(torch.randn((1, cfg.channels) + (size,) * spec.ndim))
    assert out.shape == (1, backbone.feature_dim)


def test_random_init_is_reproducible():
    a, b = create_backbone("test_resnet3d", "none"), create_backbone("test_resnet3d", "none")
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_pretrained_is_a_clear_error():
    with pytest.raises(ClinadaptError, match=r"no pretrained weights.*--weights none.*safetensors"):
        create_backbone("resnet18_3d", weights="pretrained")


def test_safetensors_round_trip_drops_the_trained_classifier(tmp_path):
    torch.manual_seed(3)
    trained = create_model("test_resnet3d", num_classes=2)
    trained.train()(torch.rand(4, 1, 16, 16, 16))  # move the BatchNorm running statistics
    trained.eval()
    file = tmp_path / "adrenal.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(file))
    assert "linear.weight" in trained.state_dict()
    backbone = create_backbone("test_resnet3d", weights=str(file))
    x = torch.rand(3, 1, 16, 16, 16)
    with torch.inference_mode():
        expected = trained.forward_head(trained.forward_features(x), pre_logits=True)
        torch.testing.assert_close(backbone.embed(x), expected)
    assert backbone.is_pretrained and len(backbone.weights_id) == 64
    assert backbone.pretrained_cfg.source == str(file)


def test_weights_of_another_architecture_name_the_file(tmp_path):
    other = create_model("test_resnet3d", conv_mode="2.5d")
    file = tmp_path / "flat.safetensors"
    save_file(other.state_dict(), str(file))
    with pytest.raises(ClinadaptError, match=r"flat.safetensors do not fit test_resnet3d.*shape"):
        create_backbone("test_resnet3d", weights=str(file))
