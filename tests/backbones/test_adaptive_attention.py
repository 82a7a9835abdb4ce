"""Adaptive temperature in the attention of timm ViTs and clinadapt's own ViTs: reversible,
faithful to timm's attention, and active only where the attention entropy is high."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from clinadapt.backbones import adaptive_attention as module
from clinadapt.backbones.adaptive_attention import adaptive_attention, attention_weights
from clinadapt.backbones.medmnist_nets import create_model
from clinadapt.errors import ConfigError
from clinadapt.eval.adaptive_temperature import softmax_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3
    ).eval()


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def mixed_tokens(dim: int = 32, n: int = 12) -> torch.Tensor:
    """Token norms from 0.05 to 20: queries from nearly uniform to one-hot attention."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, n, dim, generator=g) * torch.logspace(-1.3, 1.3, n).reshape(1, n, 1)


def test_outputs_are_bit_identical_outside_the_block_and_change_inside():
    model = tiny_vit()
    assert all(m.fused_attn for m in model.modules() if isinstance(m, Attention))
    x = images()
    with torch.no_grad():
        before = model(x)
        with adaptive_attention(model) as patched:
            during = model(x)
        after = model(x)
    assert patched == 2
    assert torch.equal(before, after)
    assert not torch.allclose(before, during, atol=1e-4)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_patch_is_undone_after_an_exception():
    model = tiny_vit()
    with pytest.raises(RuntimeError, match="inside"), adaptive_attention(model):
        raise RuntimeError("inside")
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_patched_forward_is_timms_explicit_attention_when_beta_is_one(mask, monkeypatch):
    """With the plain softmax swapped in, the patched forward reproduces timm's non-fused branch
    bit for bit, masks included: only the softmax differs."""
    torch.manual_seed(1)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = mixed_tokens()
    n = x.shape[1]
    kwargs = {
        "none": {},
        "bool": {"attn_mask": torch.rand(n, n, generator=torch.Generator().manual_seed(4)) > 0.3},
        "float": {"attn_mask": torch.randn(1, 1, n, n)},
        "causal": {"is_causal": True},
    }[mask]
    if mask == "bool":
        kwargs["attn_mask"].fill_diagonal_(True)
    attn.fused_attn = False
    with torch.no_grad():
        expected = attn(x, **kwargs)
        monkeypatch.setattr(module, "attention_weights", lambda s: s.softmax(dim=-1))
        with adaptive_attention(attn):
            got = attn(x, **kwargs)
    assert torch.equal(got, expected)


def test_attention_changes_only_where_its_entropy_exceeds_one_half(monkeypatch):
    torch.manual_seed(2)
    attn = Attention(32, num_heads=2).eval()
    seen = []

    def recording(scores):
        weights = attention_weights(scores)
        seen.append((scores, weights))
        return weights

    monkeypatch.setattr(module, "attention_weights", recording)
    with torch.no_grad(), adaptive_attention(attn):
        attn(mixed_tokens())
    (scores, weights), plain = seen[0], seen[0][0].softmax(dim=-1)
    h = softmax_entropy(scores)[..., 0]
    same = (weights == plain).all(dim=-1)
    low, high = h <= 0.5, h > 0.85
    assert low.sum() >= 4 and high.sum() >= 4  # the test covers both kinds of query
    assert same[low].all()
    assert not same[high].any()
    assert (softmax_entropy(weights.log())[..., 0][high] < h[high]).all()  # sharper


@pytest.mark.parametrize(("name", "blocks"), [("vit_t_28", 6), ("test_vit3d", 2)])
def test_clinadapts_own_vits_are_patched(name, blocks):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2).eval()
    shape = (1, 3, 28, 28) if name == "vit_t_28" else (1, 1, 16, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(x)
        with adaptive_attention(model) as patched:
            during = model(x)
        after = model(x)
    assert patched == blocks
    assert torch.equal(before, after) and not torch.equal(before, during)


def test_models_without_timm_attention_are_refused():
    model = create_model("test_resnet3d")
    with pytest.raises(ConfigError, match="ResNet has none"), adaptive_attention(model):
        pass
