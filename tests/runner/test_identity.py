"""A run's identity is its whole resolved configuration; grids over per-method options."""

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from clinadapt.errors import ConfigError
from clinadapt.runner.bench import GridConfig, expand, record_path, run_grid
from clinadapt.runner.experiment import ExperimentConfig, prepare_features
from clinadapt.runner.identity import flat_options, resolved_options, run_id

BASE = {"batch_size": 32, "bootstrap": 20}


def grid(**kw) -> GridConfig:
    options = dict(
        datasets=["synthetic-binary"],
        backbones=["test_cnn"],
        weights=["none"],
        methods=["knn"],
        shots=["2"],
        seeds=1,
        base=dict(BASE),
    )
    options.update(kw)
    return GridConfig(**options)


def test_identity_changes_with_any_result_changing_option_only():
    cfg = ExperimentConfig(dataset="synthetic-binary", method="knn", shots="5")
    same = ExperimentConfig(
        dataset="synthetic-binary",
        method="knn",
        shots="5",
        val_shots="5",  # what auto means for 5 shots
        cache_dir="/elsewhere",
        method_options={"k": 20},  # knn's default
    )
    assert run_id(cfg) == run_id(same)
    for change in (
        {"resize": "pad"},
        {"input_size": 64},
        {"precision": "fp32"},
        {"method_options": {"k": 5}},
        {"val_shots": "all"},
        {"bootstrap": 10},
    ):
        other = ExperimentConfig(dataset="synthetic-binary", method="knn", shots="5", **change)
        assert run_id(other) != run_id(cfg), change


def test_trained_runs_resolve_their_training_options():
    cfg = ExperimentConfig(dataset="synthetic-binary", method="bitfit", train={"epochs": 2})
    options = resolved_options(cfg)
    assert options["train"]["epochs"] == 2 and options["train"]["lr"] > 0
    assert "train" not in resolved_options(ExperimentConfig(method="knn"))
    flat = flat_options(options)
    assert flat["train.epochs"] == 2 and "seed" not in flat and "train.seed" not in flat


def test_rerun_with_another_option_runs_anew_and_same_command_resumes(tmp_path):
    first = run_grid(grid(), tmp_path, progress=False)
    assert first["done"] == 1
    assert run_grid(grid(), tmp_path, progress=False)["skipped"] == 1
    changed = grid(base={**BASE, "resize": "pad"})
    assert run_grid(changed, tmp_path, progress=False)["done"] == 1
    assert len(list(tmp_path.rglob("shots-2_seed-0_*.json"))) == 2


def test_report_tells_apart_runs_that_differ_in_an_option(tmp_path):
    from clinadapt.runner.records import read_records
    from clinadapt.runner.report import markdown_table, summarise

    run_grid(grid(), tmp_path, progress=False)
    run_grid(grid(base={**BASE, "resize": "pad"}), tmp_path, progress=False)
    rows = summarise(read_records(tmp_path))
    assert sorted(r["options"] for r in rows) == ["resize=nearest", "resize=pad"]
    assert all(r["seeds"] == 1 for r in rows)
    assert "| resize=pad |" in markdown_table(rows)
    assert "options" not in markdown_table([{**rows[0], "options": ""}])


def test_per_method_options_and_grids_over_them(tmp_path):
    g = grid(methods=["knn", "linear"], method_options={"knn": {"k": [1, 3]}})
    runs = expand(g)
    assert sorted((r.method, r.method_options.get("k")) for r in runs) == [
        ("knn", 1),
        ("knn", 3),
        ("linear", None),
    ]
    assert len({record_path(tmp_path, r) for r in runs}) == 3
    from clinadapt.runner.records import read_records
    from clinadapt.runner.report import summarise

    run_grid(g, tmp_path, progress=False)
    rows = summarise(read_records(tmp_path))
    assert sorted((r["method"], r["options"], r["seeds"]) for r in rows) == [
        ("knn", "method.k=1", 1),
        ("knn", "method.k=3", 1),
        ("linear", "", 1),
    ]
    comma = grid(method_options={"knn": {"k": "1,3"}})
    assert [r.method_options["k"] for r in expand(comma)] == [1, 3]
    as_value = grid(methods=["linear"], method_options={"linear": {"c_grid": [0.1, 1.0]}})
    assert [r.method_options["c_grid"] for r in expand(as_value)] == [[0.1, 1.0]]


def test_shared_method_option_unknown_to_one_method_says_how_to_scope_it():
    g = grid(methods=["knn", "linear"], base={**BASE, "method_options": {"k": 10}})
    with pytest.raises(ConfigError, match=r"method\.knn\.k"):
        expand(g)
    with pytest.raises(ConfigError, match="does not run"):
        expand(grid(method_options={"linear": {"max_iter": 5}}))
    with pytest.raises(ConfigError, match="not an option of method 'knn'"):
        expand(grid(method_options={"knn": {"kk": 5}}))


def test_training_options_reach_only_trained_methods_of_a_grid():
    runs = expand(grid(methods=["knn", "bitfit"], base={**BASE, "train": {"epochs": 1}}))
    assert {r.method: r.train for r in runs} == {"knn": {}, "bitfit": {"epochs": 1}}
    with pytest.raises(ConfigError, match="gradient-based"):
        expand(grid(base={**BASE, "train": {"epochs": 1}}))


def test_cli_per_method_options(tmp_path, capsys):
    from clinadapt.cli import main

    code = main(
        [
            "bench",
            "--datasets",
            "synthetic-binary",
            "--backbones",
            "test_cnn",
            "--weights",
            "none",
            "--methods",
            "knn,linear",
            "--shots",
            "2",
            "--seeds",
            "1",
            "--bootstrap",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "runs"),
            "--quiet",
            "method.knn.k=3",
        ]
    )
    assert code == 0, capsys.readouterr().err
    knn = next((tmp_path / "runs").rglob("knn/*.json"))
    assert json.loads(knn.read_text())["method"]["config"]["k"] == 3


def _weights_folder(path, state, kwargs):
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    config = {"architecture": "test_resnet", "create_model_kwargs": kwargs}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_feature_cache_tells_apart_model_kwargs_of_the_same_weights(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    avg = _weights_folder(tmp_path / "avg", state, {})
    mx = _weights_folder(tmp_path / "max", state, {"global_pool": "max"})
    bundles = [
        prepare_features(
            ExperimentConfig(
                dataset="synthetic-binary",
                backbone="test_cnn",
                weights=str(w),
                cache_dir=str(tmp_path / "cache"),
                precision="fp32",
                input_size=128,  # a final feature map larger than 1x1: max and mean pools differ
            ),
            progress=False,
        )
        for w in (avg, mx)
    ]
    assert not any(bundles[1].cache_hits.values())
    assert not np.allclose(bundles[0].features["test"], bundles[1].features["test"])


def test_a_validation_budget_that_follows_the_shots_is_no_differing_option(tmp_path):
    from clinadapt.runner.records import read_records
    from clinadapt.runner.report import summarise

    run_grid(grid(shots=["2", "all"]), tmp_path, progress=False)
    rows = summarise(read_records(tmp_path))
    assert [r["options"] for r in rows] == ["", ""]
    run_grid(grid(shots=["2"], base={**BASE, "val_shots": "all"}), tmp_path, progress=False)
    rows = summarise(read_records(tmp_path))
    assert sorted(r["options"] for r in rows) == [
        "val_shots=all",
        "val_shots=as shots",
        "val_shots=as shots",
    ]
