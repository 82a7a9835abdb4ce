"""LoRA: targets per architecture, options, and merging through PEFT."""

import pytest
import torch
from torch import nn

from clinadapt.adapt import AdaptedModel, create_method
from clinadapt.adapt.lora import default_targets
from clinadapt.backbones import Backbone, PretrainedConfig, create_backbone
from clinadapt.errors import ClinadaptError

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def wrap(module: nn.Module, dim: int) -> Backbone:
    return Backbone(
        "tiny", module.eval().requires_grad_(False), dim, PretrainedConfig(32), "x", False
    )


def lora(backbone, options=None, num_classes=3):
    method = create_method("lora", options)
    return method.apply(AdaptedModel(backbone, num_classes)), method


def randomise_lora_b(model):
    """B starts at zero; give it values so that merging has something to fold in."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_vit_targets_attention_and_mlp_linears_only():
    model, method = lora(create_backbone("test_vit", "none"))
    expected = [
        f"blocks.{i}.{leaf}"
        for i in range(6)
        for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert method.targets == expected
    assert method.selected()["num_targets"] == 24
    assert not any("patch_embed" in n for n in model.trainable_names())


def test_swin_targets_attention_and_mlp_but_not_patch_merging(tiny_swin):
    targets = default_targets(tiny_swin)
    assert {t.rsplit(".", 2)[-2] + "." + t.rsplit(".", 1)[-1] for t in targets} == {
        "attn.qkv",
        "attn.proj",
        "mlp.fc1",
        "mlp.fc2",
    }
    assert len(targets) == 8 and not any("downsample" in t or "patch_embed" in t for t in targets)


def test_cnn_targets_convolutions_except_stem_and_grouped():
    backbone = create_backbone("test_cnn", "none")
    convs = [n for n, m in backbone.model.named_modules() if isinstance(m, nn.Conv2d)]
    _, method = lora(backbone)
    assert "conv1.0" in convs and "conv1.0" not in method.targets  # the 3-channel stem
    assert method.targets == [n for n in convs if n != "conv1.0"]
    toy = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))
    assert default_targets(toy) == ["2"]


def test_open_clip_tower_targets_multihead_attention_and_mlp():
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(32, 16, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    model, method = lora(wrap(tower, 16))
    assert method.targets == [
        f"transformer.resblocks.{i}.{leaf}"
        for i in range(2)
        for leaf in ("attn", "mlp.c_fc", "mlp.c_proj")
    ]
    model.train()
    nn.functional.cross_entropy(model(X), torch.tensor([0, 1, 2])).backward()
    grads = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert any(".attn.lora_B." in n for n in grads)  # in_proj through PEFT's MHA layer
    assert any(".attn.base_layer.out_proj.lora_B." in n for n in grads)
    randomise_lora_b(model)
    model.eval()
    merged = method.merge(model)
    assert isinstance(merged[0], VisionTransformer)
    with torch.no_grad():
        torch.testing.assert_close(merged(X), model(X), rtol=0, atol=1e-5)


def test_rank_alpha_and_target_override():
    model, method = lora(
        create_backbone("test_vit", "none"), {"r": 4, "alpha": 8, "target_modules": ["qkv"]}
    )
    assert method.targets == [f"blocks.{i}.attn.qkv" for i in range(6)]
    qkv = model.backbone.model.model.blocks[0].attn.qkv
    assert qkv.lora_A["default"].weight.shape == (4, 64) and qkv.scaling["default"] == 2.0
    assert model.trainable_parameters() == 6 * 4 * (64 + 192) + 64 * 3 + 3


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ClinadaptError, match="cannot adapt target_modules.*'test_vit'"):
        lora(create_backbone("test_vit", "none"), {"target_modules": ["nonexistent"]})


@pytest.mark.parametrize("name", ["test_vit", "test_cnn"])
def test_merged_model_equals_adapted_model(name):
    base = create_backbone(name, "none").model
    model, method = lora(create_backbone(name, "none"))
    randomise_lora_b(model)
    model.eval()
    with torch.no_grad():
        adapted = model(X)
        assert not torch.allclose(model.head(base(X)), adapted, atol=1e-3)  # LoRA is active
        merged = method.merge(model)
        assert type(merged) is type(base)
        assert not any("lora" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(X), adapted, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(X), adapted, rtol=0, atol=0)  # the adapted model is intact
