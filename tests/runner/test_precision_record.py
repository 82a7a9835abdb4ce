"""Records state the precision actually used and why; feature-cache keys follow the used one."""

import json

import pytest

from clinadapt.engine import precision as precision_module
from clinadapt.runner.experiment import ExperimentConfig, prepare_features, run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {
    "dataset": "synthetic-binary",
    "backbone": "test_cnn",
    "weights": "none",
    "batch_size": 32,
    "bootstrap": 0,
    "input_size": 32,
}


def native(monkeypatch, supported: bool) -> None:
    monkeypatch.setattr(precision_module, "bf16_supported", lambda device: supported)


def cached_precisions(cache_dir) -> set[str]:
    return {
        json.loads(p.read_text())["parts"]["precision"]
        for p in cache_dir.glob("*.json")
        if "split" in json.loads(p.read_text())["parts"]
    }


def test_record_holds_the_measured_auto_decision(monkeypatch, tmp_path):
    native(monkeypatch, True)
    cfg = ExperimentConfig(method="prototype", cache_dir=str(tmp_path), **BASE)
    rec = run_experiment(cfg, progress=False)
    check = rec["preprocessing"]["precision_check"]
    assert check["requested"] == "auto" and check["used"] == rec["preprocessing"]["precision"]
    assert check["probe_images"] == 32 and 0 < check["cosine_min"] <= check["cosine_mean"] <= 1
    assert check["threshold"] == precision_module.AUTO_MIN_COSINE
    assert check["used"] == ("bf16" if check["cosine_min"] >= check["threshold"] else "fp32")
    assert rec["timings"]["precision_check_s"] >= 0
    assert cached_precisions(tmp_path) == {check["used"]}


def test_cache_key_contains_the_precision_used(monkeypatch, tmp_path):
    native(monkeypatch, False)
    opts = {"cache_dir": str(tmp_path), **BASE}
    fp32 = prepare_features(ExperimentConfig(precision="fp32", **opts), progress=False)
    bf16 = prepare_features(ExperimentConfig(precision="bf16", **opts), progress=False)
    assert not any(fp32.cache_hits.values()) and not any(bf16.cache_hits.values())
    assert bf16.preprocessing["precision"] == "bf16"
    assert bf16.preprocessing["precision_check"]["reason"] == "requested explicitly"
    auto = prepare_features(ExperimentConfig(precision="auto", **opts), progress=False)
    assert auto.preprocessing["precision"] == "fp32" and all(auto.cache_hits.values())
    assert auto.preprocessing["precision_check"]["cosine_min"] is None
    assert cached_precisions(tmp_path) == {"fp32", "bf16"}


@pytest.mark.parametrize("supported", [True, False])
def test_training_record_holds_the_decision(monkeypatch, tmp_path, supported):
    native(monkeypatch, supported)
    cfg = ExperimentConfig(
        method="bitfit",
        shots="8",
        train={"epochs": 1, "device": "cpu", "augment": "none"},
        **{**BASE, "batch_size": 8},  # the run's batch size is the training batch size
    )
    rec = run_experiment(cfg, run_dir=tmp_path, progress=False)
    check = rec["preprocessing"]["precision_check"]
    assert check["requested"] == "auto" and check["used"] == rec["preprocessing"]["precision"]
    assert (check["probe_images"] == 8) is supported
