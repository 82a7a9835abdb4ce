"""Honest label budgets, intervals that include seed variation, and time counted once."""

import math

import numpy as np
import pytest

from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.experiment import ExperimentConfig, run_experiment
from clinadapt.runner.records import build_record, read_records
from clinadapt.runner.report import build_report, interval, setup_time, summarise

BASE = {"batch_size": 32, "bootstrap": 50}


def run(tmp_path, **kw):
    options = dict(
        dataset="synthetic-binary",
        backbone="test_cnn",
        weights="none",
        method="linear",
        cache_dir=str(tmp_path),
        **BASE,
    )
    options.update(kw)
    return run_experiment(ExperimentConfig(**options), progress=False)


def test_few_shot_run_chooses_on_a_validation_set_within_its_budget(tmp_path):
    rec = run(tmp_path, shots="1")
    assert rec["labels_used"] == {"train": 2, "val": 2, "total": 4}
    assert rec["metrics"]["val"]["auc"] is not None
    full_val = run(tmp_path, shots="1", val_shots="all")
    assert full_val["labels_used"]["val"] == full_val["dataset"]["split_sizes"]["val"]
    assert run(tmp_path, shots="1", val_shots="3")["labels_used"]["val"] == 6


def test_methods_that_ignore_validation_count_only_their_support(tmp_path):
    rec = run(tmp_path, shots="2", method="knn")
    assert rec["labels_used"] == {"train": 4, "val": 0, "total": 4}
    # resize=auto is classification's nearest, and the record names that protocol
    assert rec["preprocessing"]["resize"] == "nearest"
    assert rec["preprocessing"]["note"].startswith("MedMNIST v2 protocol")


def test_full_data_run_uses_the_whole_validation_split(tmp_path):
    rec = run(tmp_path, shots="all")
    sizes = rec["dataset"]["split_sizes"]
    assert rec["labels_used"]["total"] == sizes["train"] + sizes["val"]


def test_trained_run_validates_within_its_budget(tmp_path):
    rec = run_experiment(
        ExperimentConfig(
            dataset="synthetic-binary",
            backbone="test_cnn",
            weights="none",
            method="bitfit",
            shots="3",
            bootstrap=0,
            train={"epochs": 1, "batch_size": 8},
        ),
        run_dir=tmp_path / "run",
        progress=False,
    )
    assert rec["labels_used"] == {"train": 6, "val": 6, "total": 12}


def test_interval_includes_seed_variation_by_the_law_of_total_variance():
    values = [0.6, 0.8, 0.7]
    cis = [[0.55, 0.65], [0.75, 0.85], [0.65, 0.75]]
    low, high = interval(values, cis)
    se_within = 0.1 / (2 * 1.959963984540054)
    naive_sd = math.sqrt(np.var(values, ddof=1) + se_within**2)
    assert high - low == pytest.approx(2 * 1.959963984540054 * naive_sd)
    assert (low + high) / 2 == pytest.approx(0.7)
    averaged = [np.mean([c[0] for c in cis]), np.mean([c[1] for c in cis])]
    assert high - low > 2 * (averaged[1] - averaged[0])  # wider than the averaged endpoints
    assert interval([0.99, 0.99], [[0.97, 1.0], [0.97, 1.0]])[1] == 1.0  # clipped to [0, 1]


def test_report_counts_shared_feature_extraction_once(tmp_path):
    grid = GridConfig(
        datasets=["synthetic-binary"],
        backbones=["test_cnn"],
        weights=["none"],
        methods=["knn", "prototype"],
        shots=["2", "all"],
        seeds=2,
        base={**BASE, "cache_dir": str(tmp_path / "cache")},
    )
    run_grid(grid, tmp_path / "runs", progress=False)
    records = read_records(tmp_path / "runs")
    assert len(records) == 8
    assert len({r["timings"]["setup_key"] for r in records}) == 1
    spent = setup_time(records)
    assert spent["setups"] == 1
    assert spent["setup_s"] == pytest.approx(records[0]["timings"]["setup_s"])
    rows = summarise(records)
    assert all(r["time_s"] < spent["setup_s"] + spent["runs_s"] for r in rows)
    md = build_report(tmp_path / "runs")["markdown"].read_text()
    assert "labelled images" in md and "over 1 setups" in md


def test_every_record_kind_is_built_one_way():
    rec = build_record("frozen", {}, timings={"setup_s": 1.0, "run_s": 2.0, "setup_key": "k"})
    assert rec["kind"] == "frozen" and rec["packages"]["torch"] and rec["peak_memory_mb"] > 0
    with pytest.raises(ValueError, match="setup_s"):
        build_record("frozen", {}, timings={"run_s": 1.0, "setup_key": "k"})
    with pytest.raises(ValueError, match="kind"):
        build_record("other", {}, timings={"setup_s": 1.0, "run_s": 2.0, "setup_key": "k"})


def test_frozen_records_name_their_kind(tmp_path):
    assert run(tmp_path, method="knn")["kind"] == "frozen"
