"""Every registered fine-tuning method honours the FineTuneMethod contract on tiny backbones."""

import copy
import dataclasses
import functools

import pytest
import timm
import torch
import torch.nn.functional as F

from clinadapt.adapt import (
    METHODS,
    AdaptedModel,
    FineTuneMethod,
    create_method,
    load_adapted,
    save_adapter,
)
from clinadapt.adapt.finetune import has_running_stats, is_norm
from clinadapt.backbones import create_backbone, get_spec
from clinadapt.errors import ClinadaptError, ConfigError

FINETUNE = [n for n in METHODS.names() if METHODS.get(n).kind == "finetune"]
BACKBONES = ["test_vit", "test_cnn"]
CASES = [(m, b) for m in FINETUNE for b in BACKBONES]
NUM_CLASSES = 3


@functools.cache
def _base(name):
    return create_backbone(name, "none")


def adapted(method_name, backbone, options=None):
    """A fresh ``(model, method)``; vpt on a CNN skips (its error has its own test)."""
    if method_name == "vpt" and get_spec(backbone).family == "cnn":
        pytest.skip("vpt is for ViTs; see test_vpt_refuses_cnns_clearly")
    torch.manual_seed(0)
    method = create_method(method_name, options)
    model = method.apply(AdaptedModel(copy.deepcopy(_base(backbone)), NUM_CLASSES))
    return model, method


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def step(model, seed=0):
    """One SGD step on random data, in train mode; returns the model in eval mode."""
    x, y = batch(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.5)
    F.cross_entropy(model(x), y).backward()
    optimiser.step()
    optimiser.zero_grad()
    return model.eval()


def _is_norm_param(model, name):
    owner = model.get_submodule(name.rpartition(".")[0])
    return is_norm(owner)


INTENDED = {
    "full": lambda model, name: True,
    "bitfit": lambda model, name: name.endswith("bias") or _is_norm_param(model, name),
    "lora": lambda model, name: ".lora_" in name,
    "adapter": lambda model, name: ".adapters." in name,
    "vpt": lambda model, name: name == "backbone.model.prompts",
    "head": lambda model, name: False,
}


def test_every_finetune_method_is_registered():
    assert {"full", "bitfit", "lora", "adapter", "vpt", "head"} <= set(METHODS.names())
    assert set(INTENDED) == set(FINETUNE)
    for name in FINETUNE:
        cls = METHODS.get(name)
        assert issubclass(cls, FineTuneMethod) and cls.description
        for f in dataclasses.fields(cls.config_cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


@pytest.mark.parametrize("name", FINETUNE)
def test_unknown_options_are_config_errors(name):
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        create_method(name, {"bogus": 1})


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("lora", {"r": 0}, "r must"),
        ("lora", {"dropout": 1.5}, "dropout"),
        ("lora", {"target_modules": []}, "target_modules"),
        ("adapter", {"style": "diagonal"}, "style"),
        ("adapter", {"bottleneck": 0}, "bottleneck"),
        ("vpt", {"num_tokens": 0}, "num_tokens"),
        ("bitfit", {"include_norm": "yes"}, "true or false"),
    ],
)
def test_invalid_options_are_config_errors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        create_method(name, options)


@pytest.mark.parametrize(("name", "backbone"), CASES)
def test_only_intended_parameters_train(name, backbone):
    model, method = adapted(name, backbone)
    assert model.method_name == name and method.kind == "finetune"
    assert model(batch()[0]).shape == (4, NUM_CLASSES)
    for param_name, p in model.named_parameters():
        intended = param_name.startswith("head.") or INTENDED[name](model, param_name)
        assert p.requires_grad == intended, param_name
    summary = model.parameter_summary()
    assert summary["trainable_parameters"] == model.trainable_parameters() > NUM_CLASSES
    assert summary["base_parameters"] == sum(p.numel() for p in _base(backbone).parameters())
    percent = model.trainable_percent()
    assert 100 < percent < 101 if name == "full" else 0 < percent < 20
    with pytest.raises(ClinadaptError, match="already adapted"):
        method.apply(model)


@pytest.mark.parametrize(("name", "backbone"), CASES)
def test_a_step_changes_only_trainable_parameters(name, backbone):
    model, _ = adapted(name, backbone)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    step(model)
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    trainable = set(model.trainable_names())
    assert changed <= trainable  # frozen parameters are bit-identical
    assert {"head.weight", "head.bias"} <= changed
    backbone_side = changed - {"head.weight", "head.bias"}
    assert bool(backbone_side) == (name != "head"), "only head-only training leaves the backbone"


@pytest.mark.parametrize("name", FINETUNE)
def test_frozen_batch_norm_statistics_do_not_drift(name):
    model, _ = adapted(name, "test_cnn")
    bns = {n: m for n, m in model.named_modules() if has_running_stats(m)}
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    model.train()
    with torch.no_grad():
        model(batch()[0] * 3 + 1)
    moved = {n for n, m in bns.items() if not torch.equal(m.running_mean, before[n])}
    assert moved.isdisjoint(model.frozen_norms)
    assert all(not model.get_submodule(n).training for n in model.frozen_norms)
    if name in ("full", "bitfit"):  # norms train, so their statistics follow the data
        assert moved == set(bns) and not model.frozen_norms
    else:
        assert not moved and set(model.frozen_norms) == set(bns)


@pytest.mark.parametrize(("name", "backbone"), CASES)
def test_save_load_round_trip(name, backbone, tmp_path):
    options = {"dropout": 0.1} if name in ("lora", "adapter", "vpt") else None
    model, method = adapted(name, backbone, options)
    step(model)
    x, _ = batch(1)
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, method, tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "adapter.safetensors",
        "adapter_config.json",
    }
    loaded, loaded_method = load_adapted(tmp_path / "run")
    assert type(loaded_method) is type(method) and loaded_method.config == method.config
    assert loaded.method_name == name and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)
    assert loaded.trainable_parameters() == model.trainable_parameters()


@pytest.mark.parametrize(("name", "backbone"), CASES)
def test_merge_equals_adapted_or_refuses_clearly(name, backbone):
    model, method = adapted(name, backbone)
    step(model)
    x, _ = batch(2)
    with torch.no_grad():
        expected = model(x)
    if not method.mergeable:
        with pytest.raises(ClinadaptError, match="merge"):
            method.merge(model)
        return
    merged = method.merge(model)
    assert not any("lora" in k or "adapter" in k for k in merged.state_dict())
    spec = get_spec(backbone)
    fresh = timm.create_model(spec.model_name, num_classes=NUM_CLASSES, **spec.kwargs).eval()
    fresh.load_state_dict(merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # merge copied


def test_vpt_refuses_cnns_clearly():
    model = AdaptedModel(copy.deepcopy(_base("test_cnn")), NUM_CLASSES)
    with pytest.raises(ClinadaptError, match="'test_cnn'.*'lora' or 'adapter'"):
        create_method("vpt").apply(model)
    assert model.method_name is None  # nothing was changed
