"""Adapter-only checkpoints: contents, strict loading, base-weights checks."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from clinadapt.adapt import AdaptedModel, create_method, load_adapted, save_adapter
from clinadapt.backbones import create_backbone
from clinadapt.errors import ClinadaptError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def saved(tmp_path, name="adapter", weights="none", options=None):
    method = create_method(name, options)
    model = method.apply(AdaptedModel(create_backbone("test_cnn", weights), 4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return model, method, save_adapter(model, method, tmp_path / "run")


def test_config_records_what_rebuilds_the_model(tmp_path):
    model, _, path = saved(tmp_path, "lora", options={"r": 2})
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["method_config"]["r"] == 2
    assert config["backbone"] == "test_cnn" and config["weights"] == "none"
    assert config["weights_id"] == "none-seed0" and config["num_classes"] == 4
    assert config["task"] == "classification"
    assert config["trainable_parameters"] == model.trainable_parameters()
    assert config["base_parameters"] == model.base_parameters
    state = load_file(str(path / "adapter.safetensors"))
    assert set(state) == set(model.trainable_state_dict())
    assert all(".lora_" in k or k.startswith("head.") for k in state)


@pytest.mark.parametrize("change", ["drop", "add", "reshape"])
def test_mismatched_adapter_files_are_refused(tmp_path, change):
    _, _, path = saved(tmp_path)
    file = path / "adapter.safetensors"
    state = load_file(str(file))
    key = sorted(state)[0]
    if change == "drop":
        del state[key]
    elif change == "add":
        state["backbone.model.extra.weight"] = torch.zeros(2)
    else:
        state[key] = torch.zeros(3, 3)
    save_file(state, str(file))
    match = {"drop": "missing keys", "add": "unexpected keys", "reshape": "shape"}[change]
    with pytest.raises(ClinadaptError, match=f"adapter.safetensors does not fit.*{match}"):
        load_adapted(path)


def test_other_base_weights_are_refused(tmp_path):
    _, _, path = saved(tmp_path)
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["weights_id"] = "sha256-of-something-else"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ClinadaptError, match="adapter_config.json.*base weights"):
        load_adapted(path)


def test_local_base_weights_are_found_again(tmp_path):
    weights = tmp_path / "base.safetensors"
    save_file(create_backbone("test_cnn", "none").model.state_dict(), str(weights))
    model, _, path = saved(tmp_path, "bitfit", weights=str(weights))
    assert json.loads((path / "adapter_config.json").read_text())["weights"] == str(
        weights.resolve()
    )
    loaded, _ = load_adapted(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model.eval()(X), rtol=0, atol=1e-6)
    with pytest.raises(ClinadaptError, match="base weights"):
        load_adapted(path, weights_override="none")  # same architecture, other weights


def test_missing_files_and_wrong_method_are_clear(tmp_path):
    with pytest.raises(ClinadaptError, match="adapter_config.json does not exist"):
        load_adapted(tmp_path)
    model, _, path = saved(tmp_path)
    (path / "adapter.safetensors").unlink()
    with pytest.raises(ClinadaptError, match="adapter.safetensors does not exist"):
        load_adapted(path)
    with pytest.raises(ClinadaptError, match="adapted with 'adapter', not with 'lora'"):
        save_adapter(model, create_method("lora"), tmp_path / "other")


def test_adapters_saved_before_tasks_load_as_classification(tmp_path):
    from clinadapt.adapt.checkpoint import load_adapted

    model, _, path = saved(tmp_path, "bitfit")
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    del config["task"]
    file.write_text(json.dumps(config))
    loaded, _ = load_adapted(path)
    assert loaded.task == "classification" and loaded.num_classes == model.num_classes
