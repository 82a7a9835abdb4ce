"""Visual prompt tuning: where prompts enter, shallow vs deep, and pooling without prompts."""

import pytest
import timm
import torch

from clinadapt.adapt import AdaptedModel, create_method
from clinadapt.adapt.vpt import PromptedViT
from clinadapt.backbones import Backbone, PretrainedConfig, create_backbone

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PATCHES = 4  # 32 px images, 16 px patches
DEPTH, DIM = 6, 64


def timm_vit(**kwargs) -> Backbone:
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=0, img_size=32, **kwargs)
    return Backbone("vit", vit.eval().requires_grad_(False), DIM, PretrainedConfig(32), "x", False)


def prompted(backbone, **options):
    model = create_method("vpt", options).apply(AdaptedModel(backbone, 3)).eval()
    assert isinstance(model.backbone.model, PromptedViT)
    return model, model.backbone.model


def block_inputs(prompted_vit):
    seen = []
    for block in prompted_vit.vit.blocks:
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize(("deep", "layers"), [(False, 1), (True, DEPTH)])
def test_shallow_and_deep_prompt_counts(deep, layers):
    model, pvit = prompted(create_backbone("test_vit", "none"), num_tokens=5, deep=deep)
    assert pvit.prompts.shape == (layers, 5, DIM)
    assert model.trainable_parameters() == layers * 5 * DIM + DIM * 3 + 3
    assert model.trainable_names() == ["backbone.model.prompts", "head.weight", "head.bias"]
    seen = block_inputs(pvit)
    with torch.no_grad():
        model(X)
    assert [s.shape[1] for s in seen] == [1 + 5 + PATCHES] * DEPTH  # the sequence keeps its length
    for i, tokens in enumerate(seen):
        fresh = torch.equal(tokens[:, 1:6], pvit.prompts[i if deep else 0].expand(2, -1, -1))
        assert fresh == (deep or i == 0), i  # deep: every block gets its own prompts


def test_prompts_follow_class_and_register_tokens():
    model, pvit = prompted(timm_vit(reg_tokens=2), num_tokens=3)
    vit = pvit.vit
    assert vit.num_prefix_tokens == 3
    seen = block_inputs(pvit)
    with torch.no_grad():
        model(X)
        embedded = vit._pos_embed(vit.patch_embed(X))
        assert pvit.forward_features(X).shape == (2, 3 + PATCHES, DIM)  # prompts removed
    first = seen[0]
    torch.testing.assert_close(first[:, :3], embedded[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(first[:, 3:6], pvit.prompts[0].expand(2, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(first[:, 6:], embedded[:, 3:], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "pool"),
    [({}, lambda t, start: t[:, 0]), ({"class_token": False, "global_pool": "avg"}, None)],
)
def test_pooling_ignores_prompt_tokens(kwargs, pool):
    model, pvit = prompted(timm_vit(**kwargs), num_tokens=4, deep=True)
    vit, n = pvit.vit, 4
    start = vit.num_prefix_tokens
    with torch.no_grad():
        seq = vit._pos_embed(vit.patch_embed(X))
        seq = torch.cat([seq[:, :start], pvit.prompts[0].expand(2, -1, -1), seq[:, start:]], 1)
        for i, block in enumerate(vit.blocks):
            if i:
                seq[:, start : start + n] = pvit.prompts[i]
            seq = block(seq)
        seq = vit.norm(seq)
        pooled = pool(seq, start) if pool else seq[:, start + n :].mean(1)  # patches only
        expected = vit.fc_norm(pooled)
        torch.testing.assert_close(model.backbone.embed(X), expected, rtol=0, atol=1e-6)


def test_prompt_dropout_acts_only_in_training():
    model, _ = prompted(create_backbone("test_vit", "none"), dropout=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(X), model(X), rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        first = model(X)
        assert not torch.allclose(first, model(X))
