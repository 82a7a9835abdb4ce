import json

import numpy as np
import pytest

from clinadapt.runner.bench import GridConfig, expand, record_path, run_grid
from clinadapt.runner.experiment import ExperimentConfig, run_experiment
from clinadapt.runner.report import build_report

BASE = {"batch_size": 32, "bootstrap": 50}


def tiny_grid(**kw) -> GridConfig:
    options = dict(
        datasets=["synthetic-binary"],
        backbones=["test_cnn"],
        weights=["none"],
        methods=["knn", "linear"],
        shots=["2", "all"],
        seeds=2,
        base=dict(BASE),
    )
    options.update(kw)
    return GridConfig(**options)


def test_run_experiment_record_has_everything_reports_need(tmp_path):
    cfg = ExperimentConfig(
        dataset="synthetic-binary",
        backbone="test_cnn",
        weights="none",
        method="prototype",
        shots="5",
        cache_dir=str(tmp_path),
        **BASE,
    )
    rec = run_experiment(cfg, progress=False)
    assert rec["task"] == "classification"
    assert rec["shots"]["support_size"] == 10
    assert rec["shots"]["actual_per_class"]
    assert rec["backbone"]["is_pretrained"] is False
    assert rec["dataset"]["provenance"]
    assert rec["preprocessing"]["resize"] == "nearest"
    assert rec["preprocessing"]["source_size"] == 28
    for key in ("auc", "acc", "balanced_accuracy", "macro_f1", "ece"):
        assert 0.0 <= rec["metrics"]["test"][key] <= 1.0
    assert set(rec["metrics"]["test_ci95"]) >= {"auc", "acc"}
    assert rec["packages"]["torch"] and rec["hardware"]["cpu_count"]
    assert rec["peak_memory_mb"] > 0
    json.dumps(rec)  # serialisable


def test_second_run_reads_features_from_cache(tmp_path):
    cfg = ExperimentConfig(
        dataset="synthetic-binary",
        backbone="test_cnn",
        weights="none",
        method="knn",
        cache_dir=str(tmp_path),
        **BASE,
    )
    first = run_experiment(cfg, progress=False)
    second = run_experiment(cfg, progress=False)
    assert not any(first["feature_cache_hits"].values())
    assert all(second["feature_cache_hits"].values())
    # extraction speed is reported where features were computed, not where they were read
    speed = first["timings"]["extraction_throughput"]
    assert speed["examples_per_s"] > 0 and speed["flops_per_example"] > 0
    assert speed["tflop_per_s"] == speed["examples_per_s"] * speed["flops_per_example"] / 1e12
    assert second["timings"]["extraction_throughput"] is None
    assert first["metrics"]["test"]["auc"] == second["metrics"]["test"]["auc"]


def test_grid_expands_every_combination():
    runs = expand(tiny_grid())
    assert len(runs) == 1 * 1 * 1 * 2 * 2 * 2
    assert {r.seed for r in runs} == {0, 1}


def test_bench_is_resumable(tmp_path, monkeypatch):
    grid = tiny_grid()
    counts = run_grid(grid, tmp_path, progress=False)
    assert counts == {"total": 8, "skipped": 0, "done": 8, "failed": 0, "claimed": 0}
    # simulate an interrupted run: one record missing, the rest are kept and skipped
    missing = record_path(tmp_path, expand(grid)[3])
    missing.unlink()
    counts = run_grid(grid, tmp_path, progress=False)
    assert counts == {"total": 8, "skipped": 7, "done": 1, "failed": 0, "claimed": 0}
    assert missing.exists()


def test_bench_records_failures_and_retries_them(tmp_path):
    grid = tiny_grid(methods=["knn"], shots=["100000"], seeds=1)
    counts = run_grid(grid, tmp_path, progress=False)
    assert counts["failed"] == 1
    rec = json.loads(record_path(tmp_path, expand(grid)[0]).read_text())
    assert rec["failed"] and "allow_fewer_shots" in rec["error"]
    assert run_grid(grid, tmp_path, progress=False)["failed"] == 1  # retried, not skipped


def test_report_from_grid(tmp_path):
    run_grid(tiny_grid(), tmp_path / "runs", progress=False)
    paths = build_report(tmp_path / "runs")
    md = paths["markdown"].read_text()
    assert "untrained control" in md
    assert md.count("| synthetic-binary |") == 4  # 2 methods x 2 shots, seeds aggregated
    assert paths["html"].read_text().startswith("<!doctype html>")
    pngs = list((tmp_path / "runs" / "report").glob("label_efficiency_*.png"))
    assert pngs and pngs[0].stat().st_size > 1000


def test_unknown_method_in_grid_is_reported_with_suggestion(tmp_path):
    from clinadapt.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="Did you mean 'knn'"):
        run_grid(tiny_grid(methods=["knnn"], seeds=1), tmp_path, progress=False)


def test_interrupted_bench_keeps_finished_runs_and_resumes(tmp_path, monkeypatch):
    import clinadapt.runner.bench as bench

    real = bench.run_on_features
    calls = {"n": 0}

    def interrupt_on_third_run(cfg, bundle, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(cfg, bundle, **kwargs)

    grid = tiny_grid()
    monkeypatch.setattr(bench, "run_on_features", interrupt_on_third_run)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path, progress=False)
    records = sorted(tmp_path.rglob("*.json"))
    assert len(records) == 2
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(bench, "run_on_features", real)
    counts = run_grid(grid, tmp_path, progress=False)
    assert counts["skipped"] == 2 and counts["done"] == 6


@pytest.mark.parametrize(
    ("backbone", "extra"),
    [("test_cnn", {"volume_mode": "planes", "max_slices": 4}), ("test_resnet3d", {})],
)
def test_volumes_through_2d_slices_and_native_3d_backbones(tmp_path, backbone, extra):
    cfg = ExperimentConfig(
        dataset="synthetic-3d",
        backbone=backbone,
        weights="none",
        method="prototype",
        cache_dir=str(tmp_path),
        **BASE,
        **extra,
    )
    rec = run_experiment(cfg, progress=False)
    assert rec["dataset"]["ndim"] == 3
    assert rec["preprocessing"].get("volume_mode") == extra.get("volume_mode")
    assert 0.0 <= rec["metrics"]["test"]["auc"] <= 1.0


def test_report_plots_auc_against_trained_parameters(tmp_path):
    grid = tiny_grid(methods=["knn", "linear", "bitfit"], shots=["all"], seeds=1)
    grid.base["train"] = {"epochs": 1}
    run_grid(grid, tmp_path / "runs", progress=False)
    paths = build_report(tmp_path / "runs")
    assert paths["auc_vs_parameters"].stat().st_size > 1000
    md = paths["markdown"].read_text()
    assert "trained params" in md and "| bitfit |" in md


def test_an_unexpected_error_in_one_run_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    import clinadapt.runner.bench as bench

    real = bench.run_on_features

    def broken_for_knn(cfg, bundle, **kwargs):
        if cfg.method == "knn":
            raise RuntimeError("boom")
        return real(cfg, bundle, **kwargs)

    monkeypatch.setattr(bench, "run_on_features", broken_for_knn)
    counts = run_grid(tiny_grid(seeds=1), tmp_path, progress=False)
    assert counts["failed"] == 2 and counts["done"] == 2
    failed = [json.loads(p.read_text()) for p in tmp_path.rglob("knn/*.json")]
    assert all(r["failed"] and "RuntimeError: boom" in r["error"] for r in failed)


def test_a_run_claimed_by_a_live_bench_is_left_and_a_dead_claim_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess

    grid = tiny_grid(methods=["knn"], shots=["2"], seeds=1)
    path = record_path(tmp_path, expand(grid)[0])
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process
    counts = run_grid(grid, tmp_path, progress=False)
    assert counts["claimed"] == 1 and not path.exists()
    child = subprocess.Popen(["true"])
    child.wait()
    lock.write_text(f"{socket.gethostname()} {child.pid}")  # its process is gone
    counts = run_grid(grid, tmp_path, progress=False)
    assert counts["done"] == 1 and path.exists() and not lock.exists()


def test_report_leaves_out_records_that_lack_what_a_row_needs(tmp_path):
    from clinadapt.runner.records import RECORD_VERSION, write_json_atomic

    run_grid(tiny_grid(methods=["knn"], seeds=1), tmp_path, progress=False)
    write_json_atomic(
        tmp_path / "odd.json", {"record_version": RECORD_VERSION, "config": {"method": "knn"}}
    )
    md = build_report(tmp_path)["markdown"].read_text()
    assert md.count("| synthetic-binary |") == 2


def test_a_frozen_method_on_segmentation_data_fails_before_any_extraction(tmp_path, monkeypatch):
    from PIL import Image

    import clinadapt.runner.experiment as experiment
    from clinadapt.errors import ConfigError

    folder = tmp_path / "seg"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i}.png"
        )
        Image.fromarray((rng.random((24, 20)) > 0.5).astype(np.uint8) * 255).save(
            folder / "masks" / f"{i}.png"
        )

    def extraction_started(*args, **kwargs):
        raise AssertionError("features were extracted for a method that cannot segment")

    monkeypatch.setattr(experiment, "make_preprocess", extraction_started)
    cfg = ExperimentConfig(dataset=str(folder), backbone="test_cnn", weights="none", method="knn")
    with pytest.raises(ConfigError, match="pooled features.*head"):
        run_experiment(cfg, progress=False)


def test_run_experiment_refuses_training_options_for_a_frozen_method(monkeypatch):
    import clinadapt.runner.experiment as experiment
    from clinadapt.errors import ConfigError

    def started(*args, **kwargs):
        raise AssertionError("the run started before it checked its options")

    monkeypatch.setattr(experiment, "prepare_features", started)
    for options in ({"train": {"epochs": 2}}, {"resume": True}):
        cfg = ExperimentConfig(dataset="synthetic-binary", method="knn", **options)
        with pytest.raises(ConfigError, match="frozen features"):
            run_experiment(cfg, progress=False)
