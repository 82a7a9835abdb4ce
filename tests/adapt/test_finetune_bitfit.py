"""BitFit trains biases (and norm parameters) only; full fine-tuning trains everything."""

import pytest

from clinadapt.adapt import AdaptedModel, create_method
from clinadapt.adapt.finetune import is_norm
from clinadapt.backbones import create_backbone


def trainable(backbone, name, options=None):
    model = create_method(name, options).apply(AdaptedModel(create_backbone(backbone, "none"), 2))
    return model, set(model.trainable_names())


@pytest.mark.parametrize("backbone", ["test_vit", "test_cnn"])
@pytest.mark.parametrize("include_norm", [True, False])
def test_bitfit_trains_biases_and_norms_only(backbone, include_norm):
    model, names = trainable(backbone, "bitfit", {"include_norm": include_norm})
    modules = dict(model.named_modules())
    norm_params = {
        f"{m}.{p}"
        for m, mod in modules.items()
        if is_norm(mod)
        for p, _ in mod.named_parameters(recurse=False)
    }
    biases = {
        n for n, _ in model.backbone.named_parameters(prefix="backbone") if n.endswith(".bias")
    }
    expected = biases | (norm_params if include_norm else set()) | {"head.weight", "head.bias"}
    assert names == expected
    assert any("norm" in n or "bn" in n for n in names)  # LayerNorm / BatchNorm parameters
    if backbone == "test_vit":
        assert {
            "backbone.model.blocks.0.attn.qkv.bias",
            "backbone.model.blocks.0.mlp.fc1.bias",
        } <= names
        assert "backbone.model.blocks.0.attn.qkv.weight" not in names
        assert ("backbone.model.norm.weight" in names) == include_norm


def test_full_trains_everything():
    model, names = trainable("test_cnn", "full")
    assert names == {n for n, _ in model.named_parameters()}
    assert model.trainable_parameters() == model.base_parameters + 96 * 2 + 2
