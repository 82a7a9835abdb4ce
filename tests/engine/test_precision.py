"""precision=auto: bf16 only where it agrees with fp32 on the run's own data; explicit honoured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clinadapt.backbones import Backbone, PretrainedConfig, create_backbone
from clinadapt.data.transforms import VolumePreprocess
from clinadapt.engine import (
    AUTO_MIN_COSINE,
    FeatureCache,
    decide_precision,
    extract_features,
    extraction_precision,
    resolve_precision,
)
from clinadapt.engine import precision as precision_module
from clinadapt.engine.precision import forward_in, row_cosine
from clinadapt.errors import ConfigError

from .conftest import tiny_preprocess
from .ddp_script import PREPROCESS, run, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)


def cancelling(width: int) -> nn.Sequential:
    """Identity in fp32, noise in bf16: +1000 then -1000 leaves values in [-1, 1] below bf16's
    resolution at 1000 (steps of 4)."""
    up, down = nn.Linear(width, width), nn.Linear(width, width)
    with torch.no_grad():
        for layer, bias in ((up, 1000.0), (down, -1000.0)):
            layer.weight.copy_(torch.eye(width))
            layer.bias.fill_(bias)
    return nn.Sequential(up, down)


def pooled(*layers: nn.Module) -> nn.Sequential:
    """(B, 3, 32, 32) -> 48 pooled values -> ``layers``."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), *layers)


def small_linear(width_in: int, width_out: int) -> nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Linear(width_in, width_out)


def tiny_backbone(name: str, model: nn.Module, dim: int) -> Backbone:
    return Backbone(name, model, dim, PretrainedConfig(input_size=32), name, False)


DISAGREES = tiny_backbone("disagrees", pooled(cancelling(48)), 48)
AGREES = tiny_backbone("agrees", pooled(small_linear(48, 16)), 16)


@pytest.fixture
def bf16_native(monkeypatch):
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: True)


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: False)


def not_called(precision: str) -> np.ndarray:
    raise AssertionError("the probe must not run")


def test_resolve_precision_from_hardware(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_auto_falls_back_to_fp32_when_bf16_changes_the_outputs(bf16_native):
    net, x = pooled(cancelling(48)), torch.rand(12, 3, 32, 32) * 2 - 1
    decision = decide_precision("auto", "cpu", lambda p: forward_in(net, x, p, torch.device("cpu")))
    assert decision.requested == "auto" and decision.used == "fp32"
    assert decision.cosine_min < 0.5 and decision.cosine_min <= decision.cosine_mean
    assert decision.threshold == AUTO_MIN_COSINE and decision.probe_images == 12
    assert "disagrees" in decision.reason
    assert set(decision.to_dict()) == {
        "requested", "used", "reason", "cosine_mean", "cosine_min", "threshold", "probe_images",
    }  # fmt: skip


def test_auto_uses_bf16_when_it_agrees_and_is_native(bf16_native):
    net, x = pooled(small_linear(48, 16)), torch.rand(12, 3, 32, 32) * 2 - 1
    decision = decide_precision("auto", "cpu", lambda p: forward_in(net, x, p, torch.device("cpu")))
    assert decision.used == "bf16" and decision.cosine_min >= AUTO_MIN_COSINE
    assert decision.probe_images == 12 and "agrees" in decision.reason


def test_auto_is_fp32_without_a_probe_where_bf16_is_not_native(no_bf16):
    decision = decide_precision("auto", "cpu", not_called)
    assert decision.used == "fp32" and decision.cosine_min is None
    assert "not native" in decision.reason


@pytest.mark.parametrize("requested", ["bf16", "fp32"])
@pytest.mark.parametrize("native", [True, False])
def test_explicit_precision_is_honoured_without_a_probe(monkeypatch, requested, native):
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: native)
    decision = decide_precision(requested, "cpu", not_called)
    assert (decision.requested, decision.used) == (requested, requested)
    assert decision.probe_images == 0 and decision.cosine_min is None


def test_row_cosine_handles_zero_rows():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(row_cosine(a, b), [1.0, 1.0, 0.0])


def test_extraction_auto_probes_the_first_batch_and_extracts_in_the_decision(bf16_native):
    kept = extraction_precision(AGREES, IMAGES, tiny_preprocess, batch_size=8)
    assert kept.used == "bf16" and kept.probe_images == 8
    dropped = extraction_precision(DISAGREES, IMAGES, tiny_preprocess, batch_size=8)
    assert dropped.used == "fp32" and dropped.cosine_min < 0.5
    opts = {"batch_size": 8, "progress": False}
    np.testing.assert_array_equal(
        extract_features(DISAGREES, IMAGES, tiny_preprocess, precision="auto", **opts),
        extract_features(DISAGREES, IMAGES, tiny_preprocess, precision="fp32", **opts),
    )
    bf16 = extract_features(AGREES, IMAGES, tiny_preprocess, precision="bf16", **opts)
    auto = extract_features(AGREES, IMAGES, tiny_preprocess, precision="auto", **opts)
    np.testing.assert_array_equal(auto, bf16)
    with pytest.raises(ConfigError, match="precision"):
        extraction_precision(AGREES, IMAGES, tiny_preprocess, precision="half")


def test_extraction_auto_embeds_the_first_batch_only_for_the_probe(bf16_native):
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return tiny_preprocess(batch)

    opts = {"batch_size": 8, "progress": False}
    auto = extract_features(DISAGREES, IMAGES, counting, precision="auto", **opts)
    assert calls == [8, 8, 8, 4]  # fp32 and bf16 probe, then the batches after the first
    fp32 = extract_features(DISAGREES, IMAGES, tiny_preprocess, precision="fp32", **opts)
    np.testing.assert_array_equal(auto, fp32)


def test_auto_without_images_is_fp32(bf16_native):
    empty = np.zeros((0, 28, 28), dtype=np.uint8)
    decision = extraction_precision(AGREES, empty, tiny_preprocess)
    assert decision.used == "fp32" and "no data" in decision.reason


@pytest.mark.parametrize(("mode", "per_batch"), [("axial", 2), ("planes", 1)])
def test_volumes_through_a_2d_backbone_probe_whole_volumes(bf16_native, mode, per_batch):
    volumes = np.random.default_rng(1).integers(0, 256, size=(5, 6, 20, 16), dtype=np.uint8)
    decision = extraction_precision(
        DISAGREES, volumes, tiny_preprocess, batch_size=12, volume_mode=mode, is_volume=True
    )
    assert decision.used == "fp32" and decision.probe_images == per_batch


def test_volume_native_backbone_is_probed_on_whole_volumes(bf16_native):
    backbone = create_backbone("test_vit3d", "none")
    cfg = backbone.pretrained_cfg
    pre = VolumePreprocess(cfg.input_size, cfg.mean, cfg.std, channels=cfg.channels)
    volumes = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 12), dtype=np.uint8)
    decision = extraction_precision(backbone, volumes, pre, batch_size=3, is_volume=False)
    assert decision.probe_images == 3 and decision.cosine_min is not None


def test_cached_decision_needs_no_forward(bf16_native, tmp_path):
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return tiny_preprocess(batch)

    cache = FeatureCache(tmp_path)
    first = extraction_precision(DISAGREES, IMAGES, counting, batch_size=8, cache=cache)
    assert calls and first.used == "fp32"
    calls.clear()
    again = extraction_precision(DISAGREES, IMAGES, counting, batch_size=8, cache=cache)
    assert again == first and not calls
    other = IMAGES[::-1].copy()  # other probe images: measured afresh
    extraction_precision(DISAGREES, other, counting, batch_size=8, cache=cache)
    assert calls


class WithBackbone(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def train_once(model: nn.Module, tmp_path, precision: str = "auto", **options):
    return run(model, tiny_data(), tmp_path, val=False, epochs=1, precision=precision, **options)


def test_training_auto_checks_the_backbone_features_on_the_first_batch(bf16_native, tmp_path):
    disagrees = WithBackbone(pooled(cancelling(48)), 48)
    result = train_once(disagrees, tmp_path / "a")
    assert result.precision == "fp32"
    check = result.precision_check
    assert check["used"] == "fp32" and check["probe_images"] == 16 and check["cosine_min"] < 0.5
    agrees = WithBackbone(pooled(small_linear(48, 16)), 16)
    result = train_once(agrees, tmp_path / "b")
    assert result.precision == "bf16" and result.precision_check["used"] == "bf16"
    assert result.precision_check["cosine_min"] >= AUTO_MIN_COSINE


def test_training_auto_preprocesses_the_probe_batch_once(bf16_native, tmp_path):
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return PREPROCESS(batch)

    train_once(WithBackbone(pooled(small_linear(48, 16)), 16), tmp_path, preprocess=counting)
    assert sum(calls) == 16 + 48  # the probe batch, then one epoch of 48 training images


def test_training_explicit_precision_is_recorded(no_bf16, tmp_path):
    result = train_once(WithBackbone(pooled(small_linear(48, 16)), 16), tmp_path, "bf16")
    assert result.precision == "bf16"
    assert result.precision_check["requested"] == "bf16"
    assert result.precision_check["reason"] == "requested explicitly"
