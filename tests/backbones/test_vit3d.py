"""The from-scratch ViTs: the 3D ViT's timm-like layout, position-embedding resampling for other
volume sizes, registry entries, weights folders, feature extraction, LoRA and gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from clinadapt.adapt import AdaptedModel, create_method
from clinadapt.backbones import create_backbone, get_spec, pretrained_config
from clinadapt.backbones.medmnist_nets import create_model
from clinadapt.backbones.vit3d import VisionTransformer3d, resample_pos_embed_3d
from clinadapt.data.transforms import VolumePreprocess
from clinadapt.engine import extract_features
from clinadapt.errors import ClinadaptError, ConfigError, DataError

VIT_NAMES = ("vit_t_28", "vit3d_t_28", "test_vit3d")


def tiny(num_classes: int = 0, **kwargs) -> VisionTransformer3d:
    torch.manual_seed(0)
    return create_model("test_vit3d", num_classes=num_classes, **kwargs).eval()


def volumes(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 1) + (size,) * 3, generator=torch.Generator().manual_seed(seed))


def nudge(model: nn.Module, seed: int = 1) -> None:
    """Move every weight off the fixed random initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_registered_as_clinadapt_vits():
    for name in VIT_NAMES:
        spec = get_spec(name)
        assert spec.library == "clinadapt" and spec.family == "vit"
        assert spec.weights_ref == f"clinadapt:{name}" and "no weights" in spec.description
        assert spec.ndim == (2 if name == "vit_t_28" else 3)
    assert get_spec("test_vit3d").tiny and not get_spec("vit3d_t_28").tiny
    cfgs = {name: pretrained_config(get_spec(name)) for name in VIT_NAMES}
    assert (cfgs["vit_t_28"].input_size, cfgs["vit_t_28"].channels) == (28, 3)
    assert cfgs["vit_t_28"].mean == cfgs["vit_t_28"].std == (0.5, 0.5, 0.5)
    assert (cfgs["vit3d_t_28"].input_size, cfgs["vit3d_t_28"].channels) == (28, 1)
    assert (cfgs["vit3d_t_28"].mean, cfgs["vit3d_t_28"].std) == ((0.0,), (1.0,))
    assert cfgs["test_vit3d"].input_size == 16


def test_layout_matches_timm_vit():
    model = tiny()
    pe = model.patch_embed
    assert isinstance(pe.proj, nn.Conv3d)
    assert pe.proj.kernel_size == pe.proj.stride == pe.patch_size == (4, 4, 4)
    assert pe.grid_size == (4, 4, 4) and pe.num_patches == 64
    assert model.cls_token.shape == (1, 1, 32) and model.pos_embed.shape == (1, 65, 32)
    assert model.num_prefix_tokens == 1 and model.no_embed_class is False
    assert model.global_pool == "token" and isinstance(model.head, nn.Identity)
    assert model.embed_dim == model.num_features == model.head_hidden_size == 32
    assert isinstance(model.blocks, nn.Sequential) and len(model.blocks) == 2
    assert all(isinstance(b, Block) for b in model.blocks)
    flat = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    flat.reset_classifier(0)
    assert list(model.state_dict()) == list(flat.state_dict())  # same names as timm's ViT
    x = volumes()
    with torch.inference_mode():
        assert pe(x).shape == (2, 64, 32)
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 65, 32)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
        torch.testing.assert_close(model(x), tokens[:, 0])


def test_timm_style_initialisation():
    model = create_model("vit3d_t_28")
    assert 0.015 < model.pos_embed.std().item() < 0.025
    qkv = model.blocks[0].attn.qkv
    assert 0.015 < qkv.weight.std().item() < 0.025 and not qkv.bias.any()
    assert not model.blocks[-1].mlp.fc2.bias.any()


def test_parameter_counts_and_full_size_shapes():
    flat, deep = create_model("vit_t_28").eval(), create_model("vit3d_t_28").eval()
    assert flat.patch_embed.num_patches == 49 and deep.patch_embed.num_patches == 64
    assert sum(p.numel() for p in flat.parameters()) == 2_688_768  # timm ViT, 192-d, 6 blocks
    assert 2_500_000 < sum(p.numel() for p in deep.parameters()) < 3_000_000
    with torch.inference_mode():
        assert flat(torch.randn(2, 3, 28, 28)).shape == (2, 192)
        assert deep(torch.randn(1, 1, 28, 28, 28)).shape == (1, 192)


def test_smaller_volumes_use_resampled_position_embeddings():
    model = tiny()
    with torch.inference_mode():
        small = model(volumes(size=8))
        odd = model.forward_features(torch.randn(1, 1, 8, 12, 16))
    assert small.shape == (2, 32) and torch.isfinite(small).all()
    assert odd.shape == (1, 1 + 2 * 3 * 4, 32)
    # on the fly == a model built for 8^3 holding the resampled embeddings (no resampling)
    built = tiny(img_size=8)
    state = model.state_dict()
    state["pos_embed"] = resample_pos_embed_3d(model.pos_embed, (2, 2, 2), (4, 4, 4))
    built.load_state_dict(state)
    with torch.inference_mode():
        torch.testing.assert_close(built(volumes(size=8)), small)


def test_resampling_keeps_class_position_and_averages_when_halving():
    pos = torch.randn(1, 1 + 4 * 4 * 4, 8)
    assert resample_pos_embed_3d(pos, (4, 4, 4), (4, 4, 4)) is pos  # the built size: unchanged
    half = resample_pos_embed_3d(pos, (2, 2, 2), (4, 4, 4))
    assert half.shape == (1, 9, 8) and torch.equal(half[:, 0], pos[:, 0])
    cubes = pos[0, 1:].reshape(2, 2, 2, 2, 2, 2, 8).mean(dim=(1, 3, 5))  # 2x2x2 blocks
    torch.testing.assert_close(half[0, 1:], cubes.reshape(8, 8))


def test_built_size_uses_the_embeddings_unchanged():
    model, x = tiny(), volumes()
    with torch.inference_mode():
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], dim=1)
        expected = model.norm(model.blocks(tokens + model.pos_embed))
        torch.testing.assert_close(model.forward_features(x), expected)


def test_sizes_the_patch_does_not_divide_and_wrong_shapes_are_clear():
    model = tiny()
    with pytest.raises(DataError, match=r"10x16x16 is not divisible by the patch size 4x4x4"):
        model(torch.randn(1, 1, 10, 16, 16))
    with pytest.raises(ConfigError, match=r"18x18x18 is not divisible by the patch size 4x4x4"):
        VisionTransformer3d(img_size=18, patch_size=4, embed_dim=8, depth=1, num_heads=1)
    with pytest.raises(DataError, match=r"\(B, C, D, H, W\).*C=1.*VolumePreprocess"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(DataError, match="C=1"):
        model(torch.randn(2, 3, 16, 16, 16))
    with pytest.raises(ConfigError, match="num_heads"):
        VisionTransformer3d(embed_dim=32, num_heads=3)


def test_classifier_gradients_and_checkpointing():
    model = tiny(num_classes=3).train()
    x = volumes()
    out = model(x)
    assert out.shape == (2, 3) and isinstance(model.get_classifier(), nn.Linear)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    model(x).square().sum().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)
    model.set_grad_checkpointing(False)
    model.reset_classifier(0)
    assert model(x).shape == (2, 32) and isinstance(model.get_classifier(), nn.Identity)


@pytest.mark.parametrize("name", VIT_NAMES)
def test_create_backbone_random_and_pretrained(name):
    backbone = create_backbone(name, "none")
    spec = get_spec(name)
    assert backbone.feature_dim == (32 if spec.tiny else 192)
    assert not any(p.requires_grad for p in backbone.parameters())
    cfg = backbone.pretrained_cfg
    with torch.inference_mode():
        out = backbone.embed(torch.randn((1, cfg.channels) + (cfg.input_size,) * spec.ndim))
    assert out.shape == (1, backbone.feature_dim)
    with pytest.raises(ClinadaptError, match="no pretrained weights"):
        create_backbone(name, "pretrained")


@pytest.mark.parametrize("name", ["test_vit3d", "vit_t_28"])
def test_weights_folder_round_trip(tmp_path, name):
    backbone = create_backbone(name, "none")
    nudge(backbone.model)
    save_file(backbone.model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": name}))
    loaded = create_backbone(name, str(tmp_path))
    cfg = backbone.pretrained_cfg
    x = torch.randn((2, cfg.channels) + (cfg.input_size,) * get_spec(name).ndim)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.embed(x), backbone.embed(x), rtol=0, atol=0)
    assert loaded.is_pretrained and len(loaded.weights_id) == 64


def test_weights_of_a_trained_classifier_load_without_the_head(tmp_path):
    trained = tiny(num_classes=2)
    nudge(trained)
    assert "head.weight" in trained.state_dict()
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    backbone = create_backbone("test_vit3d", str(tmp_path / "model.safetensors"))
    x = volumes()
    with torch.inference_mode():
        expected = trained.forward_head(trained.forward_features(x), pre_logits=True)
        torch.testing.assert_close(backbone.embed(x), expected)


def test_extract_features_from_whole_volumes():
    backbone = create_backbone("test_vit3d", "none")
    cfg = backbone.pretrained_cfg
    pre = VolumePreprocess(cfg.input_size, cfg.mean, cfg.std, channels=cfg.channels)
    data = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 12), dtype=np.uint8)
    features = extract_features(
        backbone, data, pre, batch_size=2, precision="fp32", is_volume=False, progress=False
    )
    assert features.shape == (5, 32) and np.isfinite(features).all()
    with torch.inference_mode():
        expected = backbone.embed(pre(data)).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)


def test_lora_adapts_attention_and_mlp_of_the_3d_vit():
    method = create_method("lora")
    model = method.apply(AdaptedModel(create_backbone("test_vit3d", "none"), 3))
    assert method.targets == [
        f"blocks.{i}.{leaf}"
        for i in range(2)
        for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert not any("patch_embed" in n for n in model.trainable_names())
    model.train()
    x = volumes()
    model(x).square().sum().backward()
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None for p in lora)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    with torch.inference_mode():
        adapted = model(x)
    merged = method.merge(model)
    assert isinstance(merged, VisionTransformer3d)
    with torch.inference_mode():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)
