"""Grids over how runs are tested (shifts, tta methods, batch sizes, tta options), and trained
runs tested under all of them with one model: their source run's."""

from __future__ import annotations

import json

import pytest

from clinadapt.cli import build_parser
from clinadapt.errors import ConfigError
from clinadapt.runner import bench
from clinadapt.runner.bench import GridConfig, expand, record_path, run_grid
from clinadapt.runner.experiment import ExperimentConfig, run_experiment
from clinadapt.runner.finetune import source_config
from clinadapt.runner.identity import run_id
from data import fake_corruptions  # tests/data

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"bootstrap": 0, "precision": "fp32"}
TRAINED = {**BASE, "train": {"epochs": 1, "batch_size": 8}}


@pytest.fixture
def calls(monkeypatch):
    return fake_corruptions.install(monkeypatch)


def grid(**kw) -> GridConfig:
    options = dict(
        datasets=["synthetic-binary"],
        backbones=["test_cnn"],
        weights=["none"],
        methods=["linear"],
        shots=["10"],
        seeds=1,
        base=BASE,
    )
    return GridConfig(**{**options, **kw})


def test_shifts_expand_per_corruption_and_severity_and_batch_sizes_only_where_tta_adapts(calls):
    runs = expand(
        grid(
            shifts=["none", "medmnistc:all:2-3"],
            ttas=["none", "bn", "lame"],
            tta_batch_sizes=[8, 16],
            tta_options={"bn": {"prior": [0.0, 0.5]}},
        )
    )
    shifts = ["none"] + [f"medmnistc:{c}:{s}" for c in ("fake_noise", "fake_marks") for s in (2, 3)]
    per_shift = 1 + 2 * 2 + 2  # none once; bn: 2 batch sizes x 2 priors; lame: 2 batch sizes
    assert len(runs) == len(shifts) * per_shift
    assert len({run_id(r) for r in runs}) == len(runs)
    assert [r.shift for r in runs[::per_shift]] == shifts
    first = runs[:per_shift]
    assert [(r.tta, r.tta_batch_size, r.tta_options) for r in first] == [
        ("none", 64, {}),
        ("bn", 8, {"prior": 0.0}),
        ("bn", 8, {"prior": 0.5}),
        ("bn", 16, {"prior": 0.0}),
        ("bn", 16, {"prior": 0.5}),
        ("lame", 8, {}),
        ("lame", 16, {}),
    ]


def test_without_test_time_axes_a_grid_is_as_before():
    runs = expand(grid(base={**BASE, "tta": "lame", "tta_batch_size": 32}))
    assert [(r.shift, r.tta, r.tta_batch_size) for r in runs] == [("none", "lame", 32)]


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"shifts": []}, "shifts is empty"),
        ({"ttas": ["bn"], "base": {"tta": "tent"}}, "give one of them"),
        ({"shifts": ["none"], "base": {"shift": "size:64"}}, "give one of them"),
        ({"ttas": ["bn", "tent"], "base": {"tta_options": {"lr": 0.1}}}, "set them per method"),
        ({"ttas": ["bn"], "tta_options": {"tent": {"lr": 0.1}}}, r"\['tent'\], which the grid"),
    ],
)
def test_test_time_axes_refuse_conflicting_or_empty_settings(kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        grid(**kw)


def test_a_misspelt_tta_option_of_a_grid_gets_a_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'prior'"):
        expand(grid(ttas=["bn"], tta_options={"bn": {"priro": 0.5}}))


def test_bench_command_line_takes_the_test_time_axes():
    from clinadapt.cli import _grid_from_args

    args = build_parser().parse_args(
        [
            "bench",
            "--datasets",
            "synthetic-binary",
            "--shifts",
            "none,size:64",
            "--ttas",
            "none, eata",
            "--tta_batch_sizes",
            "16,64",
            "--tta_options",
            "{eata: {d_margin: 0.4}}",
        ]
    )
    made = _grid_from_args(args)
    assert made.shifts == ["none", "size:64"] and made.ttas == ["none", "eata"]
    assert made.tta_batch_sizes == [16, 64] and made.tta_options == {"eata": {"d_margin": 0.4}}


def trained_grid(**kw) -> GridConfig:
    return grid(methods=["full"], base=TRAINED, **kw)


def test_a_trained_grid_trains_once_and_tests_every_setting_with_that_model(
    tmp_path, calls, monkeypatch
):
    trained = []
    real = bench.train_source
    monkeypatch.setattr(
        bench, "train_source", lambda *a, **k: trained.append(a[0]) or real(*a, **k)
    )
    made = trained_grid(shifts=["none", "medmnistc:fake_noise:3"], ttas=["none", "bn"])
    counts = run_grid(made, tmp_path, progress=False)
    assert counts["done"] == 4 and counts["failed"] == 0 and len(trained) == 1
    runs = expand(made)
    records = [json.loads(record_path(tmp_path, r).read_text()) for r in runs]
    source = record_path(tmp_path, runs[0]).with_suffix("")
    assert "trained_in" not in records[0] and (source / "adapter").is_dir()
    for cfg, rec in zip(runs[1:], records[1:], strict=True):
        assert rec["trained_in"] == {"run": run_id(runs[0]), "dir": str(source)}
        assert not (record_path(tmp_path, cfg).with_suffix("") / "adapter").exists()
        assert "train_s" not in rec["timings"]  # its training is the source run's
        assert rec["method"]["selected"] == records[0]["method"]["selected"]
    assert records[0]["timings"]["train_s"] > 0
    assert records[2]["tta"]["method"] == "none"
    assert records[2]["dataset"]["provenance"]["shift"]["spec"] == "medmnistc:fake_noise:3"
    # the same as training the run on its own (training is deterministic under the seed)
    alone = run_experiment(runs[3], run_dir=tmp_path / "alone", progress=False)
    assert alone["metrics"]["test"] == records[3]["metrics"]["test"]
    assert alone["calibration"] == records[3]["calibration"]


def test_a_resumed_trained_grid_restores_the_model_instead_of_training_again(
    tmp_path, calls, monkeypatch
):
    made = trained_grid(ttas=["none", "bn"])
    run_grid(made, tmp_path, progress=False)
    variant = record_path(tmp_path, expand(made)[1])
    before = json.loads(variant.read_text())
    variant.unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr("clinadapt.engine.loop.Loop._train_epoch", no_training)
    counts = run_grid(made, tmp_path, progress=False)
    assert counts["done"] == 1 and counts["failed"] == 0
    assert json.loads(variant.read_text())["metrics"] == before["metrics"]


def test_a_grid_without_the_source_run_trains_and_records_it_too(tmp_path):
    made = trained_grid(ttas=["bn"], tta_batch_sizes=[16])
    [run] = expand(made)
    assert run_grid(made, tmp_path, progress=False)["done"] == 1
    source = json.loads(record_path(tmp_path, source_config(run)).read_text())
    assert source["tta"]["method"] == "none" and "trained_in" not in source
    assert json.loads(record_path(tmp_path, run).read_text())["trained_in"]["run"] == run_id(
        source_config(run)
    )


def test_a_tta_method_the_trained_model_cannot_use_fails_its_own_runs_only(tmp_path):
    made = grid(
        methods=["full"],
        backbones=["test_vit"],
        base=TRAINED,
        ttas=["none", "bn", "lame"],
        tta_batch_sizes=[16],
    )
    counts = run_grid(made, tmp_path, progress=False)
    assert counts["done"] == 2 and counts["failed"] == 1
    failed = [json.loads(record_path(tmp_path, r).read_text()) for r in expand(made)]
    assert [r.get("failed", False) for r in failed] == [False, True, False]
    assert "test_vit has none" in failed[1]["error"]


def test_a_source_given_another_run_s_training_is_refused(tmp_path):
    from clinadapt.runner.finetune import evaluate_trained, train_source

    cfg = ExperimentConfig(
        dataset="synthetic-binary",
        backbone="test_cnn",
        weights="none",
        method="full",
        shots="10",
        **TRAINED,
    )
    source = train_source(cfg, tmp_path / "a", progress=False)
    other = ExperimentConfig(**{**cfg.__dict__, "seed": 1})
    with pytest.raises(ConfigError, match="more than its test-time options"):
        evaluate_trained(other, source, tmp_path / "b", progress=False)


def test_reliability_diagrams_can_be_left_out_of_a_grid_s_runs(tmp_path):
    for method, base in (("linear", BASE), ("full", TRAINED)):
        made = grid(methods=[method], base={**base, "reliability_diagram": False}, ttas=["lame"])
        assert run_grid(made, tmp_path / method, progress=False)["failed"] == 0
        records = list((tmp_path / method).rglob("shots-*.json"))
        assert len(records) == (1 if method == "linear" else 2)  # a trained grid adds its source
        for path in records:
            calibration = json.loads(path.read_text())["calibration"]
            assert "diagram" not in calibration and calibration["test"]["before"]["ece"] >= 0
        assert not list((tmp_path / method).rglob("reliability.png"))
