"""Runs on a shifted test set: the shift is part of the run id and of the features' identity,
recorded in the dataset block, and refused where it cannot apply. A fake corruption table
stands in for medmnistc."""

from __future__ import annotations

import numpy as np
import pytest

from clinadapt.errors import ConfigError
from clinadapt.runner.experiment import ExperimentConfig, prepare_features, run_experiment
from clinadapt.runner.identity import bundle_key, resolved_options, run_id
from data import fake_corruptions  # tests/data

BASE = {
    "dataset": "synthetic-binary",
    "backbone": "test_cnn",
    "weights": "none",
    "method": "knn",
    "bootstrap": 0,
    "precision": "fp32",
}


@pytest.fixture
def calls(monkeypatch):
    return fake_corruptions.install(monkeypatch)


def test_the_shift_is_part_of_the_run_id_and_none_keeps_old_ids(tmp_path, monkeypatch):
    clean = ExperimentConfig(**BASE)
    assert "shift" not in resolved_options(clean)  # ids of runs made before shifts stay
    assert run_id(ExperimentConfig(**BASE, shift=" None")) == run_id(clean)
    noisy = ExperimentConfig(**BASE, shift="medmnistc:fake_noise:2")
    assert resolved_options(noisy)["shift"] == "medmnistc:fake_noise:2"
    assert run_id(noisy) != run_id(clean) and bundle_key(noisy) != bundle_key(clean)
    same = ExperimentConfig(**BASE, shift="MedMNISTC:Fake_Noise:2-2")
    assert run_id(same) == run_id(noisy)
    assert run_id(ExperimentConfig(**BASE, shift="medmnistc:fake_noise:3")) != run_id(noisy)
    monkeypatch.chdir(tmp_path)
    relative = ExperimentConfig(**BASE, shift="target:site")
    absolute = ExperimentConfig(**BASE, shift=f"target:{tmp_path / 'site'}")
    assert run_id(relative) == run_id(absolute)


def test_bad_shifts_fail_when_the_config_is_made():
    with pytest.raises(ConfigError, match="Did you mean 'medmnistc'"):
        ExperimentConfig(**BASE, shift="medmnist:fake_noise:2")
    with pytest.raises(ConfigError, match="severity must be 1-5"):
        ExperimentConfig(**BASE, shift="medmnistc:fake_noise:9")
    with pytest.raises(ConfigError, match="for classification"):
        ExperimentConfig(dataset="kvasir_seg", method="head", shift="size:64")


def test_a_frozen_run_records_the_shift_and_extracts_only_the_shifted_test_set(
    tmp_path, calls, one_thread
):
    cache = {"cache_dir": str(tmp_path / "features")}
    clean = run_experiment(ExperimentConfig(**BASE, **cache), progress=False)
    assert clean["dataset"]["provenance"]["shift"] == {"spec": "none", "kind": "none"}
    cfg = ExperimentConfig(**BASE, **cache, shift="medmnistc:fake_noise:5")
    shifted = run_experiment(cfg, progress=False)
    assert shifted["feature_cache_hits"] == {"train": True, "val": True, "test": False}
    shift = shifted["dataset"]["provenance"]["shift"]
    assert shift["spec"] == "medmnistc:fake_noise:5" and shift["blocks"][0]["stop"] == 100
    assert shifted["run"]["options"]["shift"] == "medmnistc:fake_noise:5"
    assert shifted["dataset"]["split_sizes"]["test"] == 100
    again = prepare_features(cfg, progress=False)
    assert all(again.cache_hits.values()) and len(calls) == 100  # corrupted once, cached
    base = prepare_features(ExperimentConfig(**BASE, **cache), progress=False)
    assert not np.allclose(again.features["test"], base.features["test"])
    np.testing.assert_array_equal(again.features["train"], base.features["train"])


def test_a_trained_run_is_tested_on_the_shifted_set(tmp_path, calls, one_thread):
    options = {**BASE, "method": "full", "shots": "10", "train": {"epochs": 1, "batch_size": 8}}
    rec = run_experiment(
        ExperimentConfig(**options, shift="medmnistc:all:4"), run_dir=tmp_path / "r", progress=False
    )
    shift = rec["dataset"]["provenance"]["shift"]
    assert [b["corruption"] for b in shift["blocks"]] == ["fake_noise"]  # fake_marks needs 40 px
    assert shift["left_out"] == {"fake_marks": [4]}
    assert rec["dataset"]["split_sizes"]["test"] == 100 and len(calls) == 100
