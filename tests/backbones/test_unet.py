"""MONAI's U-Net as a from-scratch backbone: registry specs, full-resolution dense maps in 2D and
3D, any input size through internal padding, pooled features, weights round trip, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from clinadapt.backbones import BACKBONES, create_backbone, get_spec, pretrained_config
from clinadapt.backbones.medmnist_nets import create_model
from clinadapt.backbones.unet import UNet
from clinadapt.errors import ClinadaptError, ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")

UNETS = ["unet", "unet3d", "test_unet", "test_unet3d"]


def norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "Norm" in type(m).__name__]


def test_registered_specs_and_input_configs():
    assert set(UNETS) <= set(BACKBONES)
    expected = {  # ndim, input size, channels, mean, std, tiny
        "unet": (2, 224, 3, 0.5, 0.5, False),
        "unet3d": (3, 64, 1, 0.0, 1.0, False),
        "test_unet": (2, 32, 3, 0.5, 0.5, True),
        "test_unet3d": (3, 16, 1, 0.0, 1.0, True),
    }
    for name, (ndim, size, channels, mean, std, tiny) in expected.items():
        spec = get_spec(name)
        cfg = pretrained_config(spec)
        assert (spec.library, spec.family, spec.ndim, spec.tiny) == ("clinadapt", "cnn", ndim, tiny)
        assert (cfg.input_size, cfg.channels) == (size, channels)
        assert cfg.mean == (mean,) * channels and cfg.std == (std,) * channels
    assert get_spec("unet").description == (
        "MONAI U-Net (2D) for segmentation from scratch; no weights"
    )


def test_unet_is_monais_residual_unet_with_instance_norm():
    from monai.networks.nets import UNet as MonaiUNet

    model = create_model("unet")
    assert isinstance(model.unet, MonaiUNet) and model.multiple == 16
    assert model.unet.channels == (16, 32, 64, 128, 256) and model.unet.strides == (2, 2, 2, 2)
    assert model.unet.num_res_units == 2 and model.unet.out_channels == model.num_features == 32
    assert norms(model) and all(isinstance(m, nn.InstanceNorm2d) and m.affine for m in norms(model))
    deep = create_model("unet3d")
    assert deep.unet.channels == (16, 32, 64, 128) and deep.multiple == 8
    assert norms(deep) and all(isinstance(m, nn.InstanceNorm3d) for m in norms(deep))


def test_unet_backbone_gives_a_full_resolution_map_and_pooled_features():
    backbone = create_backbone("unet", "none")
    assert (backbone.ndim, backbone.feature_dim, backbone.dense_dim) == (2, 32, 32)
    assert backbone.dense_stride == (1, 1)
    assert not backbone.is_pretrained and not any(p.requires_grad for p in backbone.parameters())
    x = torch.randn(2, 3, 48, 64)
    with torch.inference_mode():
        dense, pooled = backbone.dense(x), backbone.embed(x)
    assert dense.shape == (2, 32, 48, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, dense.mean((2, 3)))


def test_unet3d_backbone_gives_a_full_resolution_volume_map():
    backbone = create_backbone("unet3d", "none")
    assert (backbone.ndim, backbone.feature_dim) == (3, 32)
    x = torch.randn(1, 1, 16, 24, 8)
    with torch.inference_mode():
        assert backbone.dense(x).shape == (1, 32, 16, 24, 8)
        assert backbone.embed(x).shape == (1, 32)
    tiny = create_backbone("test_unet3d", "none")
    assert (tiny.dense_dim, tiny.dense_stride, tiny.feature_dim) == (8, (1, 1, 1), 8)


@pytest.mark.parametrize(
    ("name", "size"),
    [("test_unet", (37, 50)), ("test_unet", (1, 3)), ("test_unet3d", (9, 13, 6))],
)
def test_any_input_size_works(name, size):
    model = create_model(name).eval()
    x = torch.randn(2, model.in_channels, *size)
    with torch.inference_mode():
        assert model.forward_dense(x).shape == (2, 8, *size)
        assert model(x).shape == (2, 8)


def test_sizes_are_zero_padded_half_before_half_after_and_cropped_back():
    model = create_model("test_unet").eval()  # needs multiples of 4
    x = torch.randn(1, 3, 13, 16)
    with torch.inference_mode():
        padded = model.unet(F.pad(x, (0, 0, 1, 2)))  # 13 -> 16: one row before, two after
        torch.testing.assert_close(model.forward_dense(x), padded[:, :, 1:14])
        divisible = torch.randn(1, 3, 16, 20)
        torch.testing.assert_close(model.forward_dense(divisible), model.unet(divisible))


def test_instance_norm_makes_each_image_independent_of_its_batch():
    torch.manual_seed(0)
    model = create_model("test_unet").train()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model.forward_dense(x)[:1], model.forward_dense(x[:1]))


def test_training_reaches_every_parameter():
    model = create_model("test_unet3d", num_classes=2).train()
    x = torch.randn(2, 1, 8, 8, 8)
    (model.forward_dense(x).square().mean() + model(x).sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(x).shape == (2, 2)


def test_safetensors_round_trip_drops_the_trained_classifier(tmp_path):
    torch.manual_seed(3)
    trained = create_model("test_unet", num_classes=2).eval()
    file = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(file))
    assert "linear.weight" in trained.state_dict()
    backbone = create_backbone("test_unet", weights=str(file))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.dense(x), trained.forward_dense(x))
    assert backbone.is_pretrained and len(backbone.weights_id) == 64


def test_pretrained_is_a_clear_error():
    with pytest.raises(ClinadaptError, match="no pretrained weights.*--weights none"):
        create_backbone("unet", "pretrained")


def test_wrong_inputs_and_arguments_are_clear():
    model = create_model("test_unet3d")
    with pytest.raises(DataError, match=r"3D U-Net takes \(B, C, D, H, W\) volumes with C=1"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(DataError, match=r"C=1, got shape \(1, 3, 8, 8, 8\)"):
        model(torch.randn(1, 3, 8, 8, 8))
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        UNet(spatial_dims=1)
    with pytest.raises(ConfigError, match="channels needs 2 or more"):
        UNet(channels=(16,))
    with pytest.raises(ConfigError, match="features must be positive"):
        UNet(features=0)
