"""Local weights: safetensors files and folders, pickle trust, clear errors, shared real weights."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from clinadapt.backbones import create_backbone
from clinadapt.backbones.weights import file_sha256
from clinadapt.errors import ClinadaptError, ConfigError, UnsafeCheckpointError
from clinadapt.paths import cache_home

SHARED_WEIGHTS = Path(__file__).resolve().parents[2].parent / "shared" / "weights"
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def trained() -> torch.nn.Module:
    """A test_vit *with* a 10-class head, as a fine-tuned checkpoint would be saved."""
    torch.manual_seed(1)
    return timm.create_model("test_vit", img_size=32, num_classes=10).eval()


def _features(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.forward_head(model.forward_features(X), pre_logits=True)


def _embed(backbone) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.embed(X)


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_safetensors_file_round_trip_drops_classifier(trained, tmp_path):
    file = _save(trained, tmp_path / "vit.safetensors")
    backbone = create_backbone("test_vit", weights=str(file))
    torch.testing.assert_close(_embed(backbone), _features(trained))
    assert backbone.feature_dim == 64 and backbone.is_pretrained
    assert backbone.weights_id == hashlib.sha256(file.read_bytes()).hexdigest()
    assert backbone.pretrained_cfg.source == str(file)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_folder_config_overrides_preprocessing(trained, tmp_path):
    _save(trained, tmp_path / "model.safetensors")
    config = {
        "architecture": "test_vit",
        "create_model_kwargs": {"img_size": 32, "num_classes": 10},
        "input_size": [3, 32, 32],
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
        "interpolation": "bilinear",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    backbone = create_backbone("test_vit", weights=str(tmp_path))
    torch.testing.assert_close(_embed(backbone), _features(trained))
    cfg = backbone.pretrained_cfg
    assert (cfg.mean, cfg.std, cfg.interpolation, cfg.input_size) == (
        (0.1, 0.2, 0.3),
        (0.4, 0.5, 0.6),
        "bilinear",
        32,
    )


def test_pickle_refused_unless_trusted(trained, tmp_path):
    file = tmp_path / "vit.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, file)
    with pytest.raises(UnsafeCheckpointError, match="vit.pth"):
        create_backbone("test_vit", weights=str(file))
    backbone = create_backbone("test_vit", weights=str(file), trust_pickle=True)
    torch.testing.assert_close(_embed(backbone), _features(trained))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(trained, tmp_path, damage):
    file = _save(trained, tmp_path / "vit.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a tensor file")
    with pytest.raises(ClinadaptError, match="vit.safetensors.*corrupt"):
        create_backbone("test_vit", weights=str(file))


def test_architecture_mismatch_names_both(trained, tmp_path):
    _save(trained, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    with pytest.raises(ClinadaptError, match="'resnet18'.*'test_vit'"):
        create_backbone("test_vit", weights=str(tmp_path))


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"input_size": "abc"}, "input_size"),
        ({"input_size": [3, "x", 32]}, "input_size"),
        ({"input_size": 0}, "input_size"),
        ({"input_size": True}, "input_size"),
        ({"mean": 0.5}, "mean"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.1, "a", 0.3]}, "std"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"interpolation": 3}, "interpolation"),
        ({"pretrained_cfg": 5}, "pretrained_cfg"),
        ({"pretrained_cfg": {"input_size": "abc"}}, "pretrained_cfg.input_size"),
        ({"create_model_kwargs": [1, 2]}, "create_model_kwargs"),
        ({"model_args": "img_size=32"}, "model_args"),
        ({"architecture": 5}, "architecture"),
        ({"architecture": ["test_vit"]}, "architecture"),
        ({"architecture": "no_such_network"}, "architecture"),
        ({"create_model_kwargs": {"img_size": 32, "no_such_option": 1}}, "create_model_kwargs"),
    ],
)
def test_config_with_wrong_values_names_the_file_and_key(trained, tmp_path, config, key):
    _save(trained, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_vit", **config}))
    with pytest.raises(ConfigError, match=rf"config\.json.*\b{re.escape(key)}\b") as err:
        create_backbone("test_vit", weights=str(tmp_path))
    assert str(tmp_path / "config.json") in str(err.value)


def test_shape_mismatch_names_the_file(tmp_path):
    cnn = timm.create_model("test_resnet", num_classes=0)
    file = _save(cnn, tmp_path / "cnn.safetensors")
    with pytest.raises(ClinadaptError, match="cnn.safetensors do not fit test_vit"):
        create_backbone("test_vit", weights=str(file))


def test_position_embeddings_are_resampled_by_timm(trained, tmp_path):
    file = _save(trained, tmp_path / "vit32.safetensors")
    backbone = create_backbone("timm:test_vit", weights=str(file))  # timm default: 160 px
    out = backbone.embed(torch.randn(1, 3, 160, 160))
    assert out.shape == (1, 64)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "absent.safetensors", "do not exist"),
        (lambda d: d, "has no model.safetensors"),
        (lambda d: (d / "w.npz").write_bytes(b"x") and d / "w.npz", "neither .safetensors"),
    ],
)
def test_bad_weights_paths(tmp_path, make, message):
    with pytest.raises(ClinadaptError, match=message):
        create_backbone("test_vit", weights=str(make(tmp_path)))


def test_file_hash_is_remembered_until_the_file_changes(tmp_path):
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"first")
    first = file_sha256(file)
    assert first == hashlib.sha256(b"first").hexdigest()
    (memo,) = (cache_home() / "hashes").glob("*.json")
    saved = json.loads(memo.read_text())
    memo.write_text(json.dumps({**saved, "sha256": "remembered"}))
    assert file_sha256(file) == "remembered"
    file.write_bytes(b"second, longer")
    assert file_sha256(file) == hashlib.sha256(b"second, longer").hexdigest()


@pytest.mark.shared
def test_shared_mobilenetv2_folder_loads():
    folder = SHARED_WEIGHTS / "mobilenetv2_100_imagenet_tf2_ptq"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"real converted weights not found at {folder} (../shared/weights absent)")
    backbone = create_backbone("mobilenetv2_100", weights=str(folder))
    assert backbone.feature_dim == 1280 and backbone.is_pretrained
    cfg = backbone.pretrained_cfg
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)
    assert (cfg.input_size, cfg.interpolation) == (224, "bilinear")
    assert len(backbone.weights_id) == 64
    with torch.inference_mode():
        assert backbone.embed(torch.zeros(1, 3, 224, 224)).shape == (1, 1280)
