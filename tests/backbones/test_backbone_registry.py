"""Named backbones: every alias resolves; tiny ones build, embed and are frozen; helpful errors."""

from __future__ import annotations

import sys

import pytest
import torch

from clinadapt.backbones import (
    BACKBONES,
    Backbone,
    create_backbone,
    get_spec,
    pretrained_config,
)
from clinadapt.backbones.registry import import_open_clip
from clinadapt.errors import ClinadaptError, UnknownNameError

TINY = [name for name in BACKBONES if BACKBONES.get(name).tiny]
REQUIRED = {
    "dinov2_vits14", "dinov2_vitb14", "vit_b16", "vit_s16", "clip_vitb16", "resnet18",
    "resnet50", "convnext_tiny", "swin_tiny", "mobilenetv2_100", "mobilenetv1_100",
    "test_vit", "test_cnn",
}  # fmt: skip


def _embed_once(backbone: Backbone, batch: int = 2) -> torch.Tensor:
    cfg, ndim = backbone.pretrained_cfg, get_spec(backbone.name).ndim
    with torch.inference_mode():
        return backbone.embed(torch.randn((batch, cfg.channels) + (cfg.input_size,) * ndim))


def test_required_aliases_registered():
    assert set(BACKBONES) >= REQUIRED
    assert {"test_vit", "test_cnn"} <= set(TINY)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_alias_resolves_to_a_spec_and_config(name):
    spec = get_spec(name)
    assert spec.name == name and spec.library in ("timm", "open_clip", "clinadapt")
    cfg = pretrained_config(spec)
    assert cfg.input_size > 0 and len(cfg.mean) == len(cfg.std) == cfg.channels
    assert cfg.source == spec.weights_ref


def test_dinov2_runs_at_224_and_tiny_models_at_small_sizes():
    assert pretrained_config(get_spec("dinov2_vits14")).input_size == 224
    for name in TINY:
        assert pretrained_config(get_spec(name)).input_size <= 64


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbones_build_embed_and_are_frozen(name):
    backbone = create_backbone(name, weights="none")
    out = _embed_once(backbone)
    assert out.shape == (2, backbone.feature_dim)
    assert backbone.weights_id == "none-seed0" and backbone.is_pretrained is False
    assert backbone.pretrained_cfg.source == "random (seed 0)"
    assert not backbone.training and not backbone.model.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_mid_size_cnn_builds_with_random_weights():
    backbone = create_backbone("mobilenetv2_100", weights="none")
    assert backbone.feature_dim == 1280
    assert _embed_once(backbone, batch=1).shape == (1, 1280)


def test_clip_image_tower_builds_with_random_weights():
    backbone = create_backbone("clip_vitb16", weights="none")
    assert backbone.feature_dim == 512
    assert backbone.pretrained_cfg.mean[0] == pytest.approx(0.48145466)
    assert _embed_once(backbone, batch=1).shape == (1, 512)


def test_any_timm_model_by_prefix():
    spec = get_spec("timm:test_convnext")
    assert spec.model_name == "test_convnext" and spec.family == "timm"
    backbone = create_backbone("timm:test_convnext", weights="none")
    out = backbone.embed(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, backbone.feature_dim)
    assert get_spec("timm:resnet18.a1_in1k").pretrained_tag == "a1_in1k"


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("dinov2_vits41", "dinov2_vits14"),
        ("timm:resnt18", "resnet18"),
        ("resnet34", "timm:resnet34"),
    ],
)
def test_unknown_names_say_did_you_mean(name, hint):
    with pytest.raises(UnknownNameError, match=hint):
        get_spec(name)


def test_unknown_timm_tag_is_a_clear_error():
    with pytest.raises(UnknownNameError, match="no pretrained tag 'a1_in1kk'.*a1_in1k"):
        get_spec("timm:resnet18.a1_in1kk")


def test_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ClinadaptError, match=r"pip install 'clinadapt\[clip\]'"):
        import_open_clip()
    with pytest.raises(ClinadaptError, match="clinadapt"):
        create_backbone("clip_vitb16", weights="none")


def test_untrained_control_is_reproducible():
    first = create_backbone("test_cnn", "none")
    torch.manual_seed(123)  # the global RNG state must not matter
    second = create_backbone("test_cnn", "none")
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
