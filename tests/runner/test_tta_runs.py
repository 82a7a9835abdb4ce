"""Test-time options in runs, records, predict and reports: tta, adaptive temperature, and the
calibration block every classification record gets."""

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from clinadapt.adapt import create_method
from clinadapt.cli import main
from clinadapt.data import load_dataset
from clinadapt.engine import extract_features
from clinadapt.engine.predict import predict_proba
from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.eval.adaptive_temperature import POLYNOMIAL
from clinadapt.eval.calibration import (
    apply_temperature,
    calibration_metrics,
    fit_temperature,
    logits_from_probabilities,
)
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.common import sample_support, sample_validation
from clinadapt.runner.experiment import (
    ExperimentConfig,
    prepare_features,
    run_experiment,
    run_on_features,
)
from clinadapt.runner.predict import load_run
from clinadapt.runner.records import write_json_atomic
from clinadapt.runner.tta import (
    SliceFeatures,
    adaptive_output,
    image_batches,
    probe_model,
    trained_model,
)
from clinadapt.tasks import task_for
from clinadapt.tta import create_tta

pytestmark = pytest.mark.usefixtures("one_thread")

CNN = ["--dataset", "synthetic-multiclass", "--backbone", "test_cnn", "--weights", "none"]
TRAIN = ["--method", "full", "--shots", "10", "train.epochs=1", "train.batch_size=16"]
QUIET = ["bootstrap=0", "--precision", "fp32", "--quiet"]
TENT = ["--tta", "tent", "--tta-batch-size", "16", "tta.lr=0.05"]
FROZEN = dict(
    dataset="synthetic-multiclass",
    backbone="test_cnn",
    weights="none",
    method="linear",
    shots="10",
    bootstrap=0,
    precision="fp32",  # the probe's features as the backbone computes them in a tta batch
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same training run twice: evaluated plainly, and with tent."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("plain", []), ("tent", TENT)):
        assert main(["train", *CNN, *TRAIN, "--out", str(root / name), *QUIET, *extra]) == 0
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare_features(ExperimentConfig(**FROZEN, cache_dir=str(cache)), progress=False)


def record(run_dir):
    return json.loads((run_dir / "record.json").read_text())


def scalars(metrics):
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def folder_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tent_changes_a_trained_run_s_predictions_but_not_its_saved_adapter(trained):
    plain, tent = record(trained / "plain"), record(trained / "tent")
    assert plain["run"]["id"] != tent["run"]["id"]
    assert plain["tta"] == {"method": "none", "applied": False, **plain["tta"]}
    assert tent["tta"]["applied"] and tent["tta"]["method"] == "tent"
    assert tent["tta"]["options"]["lr"] == 0.05 and tent["tta"]["batch_size"] == 16
    stats = tent["tta"]["stats"]
    assert stats["examples"] == 100 and stats["batches"] == 7 and stats["updates"] == 7
    assert stats["adapted"] == 100 and stats["resets"] == stats["collapses"] == 0
    assert tent["tta"]["seconds_per_image"] > 0
    assert tent["calibration"]["test"]["before"] != plain["calibration"]["test"]["before"]
    # the same training, saved before evaluation: tent adapted a copy only
    assert folder_digest(trained / "tent" / "adapter") == folder_digest(
        trained / "plain" / "adapter"
    )


def test_a_default_run_evaluates_the_trained_model_as_before(trained):
    rec = record(trained / "plain")
    _, model, _, preprocess = load_run(trained / "plain")
    test = load_dataset("synthetic-multiclass")["test"]
    probs = predict_proba(
        model, test.images, task="multi-class", preprocess=preprocess, progress=False
    )
    expected = task_for("multi-class").evaluate(test.labels, probs, "multi-class")
    assert scalars(rec["metrics"]["test"]) == pytest.approx(scalars(expected), abs=1e-12)
    assert rec["adaptive_temperature"] == {"mode": "off", "applied": False}
    cal = rec["calibration"]
    assert cal["test"]["before"] == pytest.approx(
        calibration_metrics(probs, test.labels, "multi-class"), abs=1e-6
    )
    scaled = apply_temperature(
        logits_from_probabilities(probs, "multi-class"), cal["temperature"], "multi-class"
    )
    assert cal["test"]["after"] == pytest.approx(
        calibration_metrics(scaled, test.labels, "multi-class"), abs=1e-6
    )
    assert cal["fitted"] and cal["val_examples"] == 40  # 10 per class, as the run used
    assert (trained / "plain" / cal["diagram"]).stat().st_size > 0


def test_explicit_defaults_are_the_same_run():
    base = ExperimentConfig(**FROZEN)
    same = ExperimentConfig(
        **FROZEN, tta="none", tta_mode="continual", tta_batch_size=8, adaptive_temperature="off"
    )
    from clinadapt.runner.identity import flat_options, resolved_options, run_id

    assert run_id(same) == run_id(base)
    assert not {"tta", "tta_options", "tta_mode", "adaptive_temperature"} & set(
        resolved_options(base)
    )
    flat = flat_options(resolved_options(base))
    assert flat["tta"] == "none" and flat["adaptive_temperature"] == "off"
    tent = ExperimentConfig(**FROZEN, tta="t3a")
    assert run_id(tent) != run_id(base)
    assert run_id(ExperimentConfig(**FROZEN, tta="t3a", tta_options={"filter_k": 100})) == run_id(
        tent
    )
    assert flat_options(resolved_options(tent))["tta.filter_k"] == 100


def _fitted_probe(cfg, bundle):
    info = bundle.info
    support, _ = sample_support(cfg, info, bundle.labels["train"])
    picked = sample_validation(cfg, info, bundle.labels["val"])
    val = (bundle.features["val"][picked], bundle.labels["val"][picked])
    probe = create_method("linear").fit(
        bundle.features["train"][support],
        bundle.labels["train"][support],
        info.task,
        info.num_classes,
        val=val,
        seed=cfg.seed,
    )
    return probe, val


def test_a_linear_probe_run_with_t3a_adapts_on_its_extracted_features(bundle):
    cfg = ExperimentConfig(**FROZEN, tta="t3a", tta_batch_size=32)
    rec = run_on_features(cfg, bundle)
    assert rec["tta"]["inputs"] == "extracted features" and rec["tta"]["stats"]["batches"] == 4
    probe, _ = _fitted_probe(cfg, bundle)
    model = probe_model(probe, nn.Identity(), "test_cnn")
    features = torch.from_numpy(bundle.features["test"])
    batches = [features[i : i + 32] for i in range(0, 100, 32)]
    expected = create_tta("t3a").run(model, batches, seed=0).probabilities
    test_y = bundle.labels["test"]
    metrics = task_for("multi-class").evaluate(test_y, expected, "multi-class")
    assert scalars(rec["metrics"]["test"]) == pytest.approx(scalars(metrics), abs=1e-9)
    plain = run_on_features(ExperimentConfig(**FROZEN), bundle)
    assert rec["metrics"]["test"] != plain["metrics"]["test"]


def test_the_calibration_block_is_eval_calibration_on_the_run_s_outputs(bundle, tmp_path):
    cfg = ExperimentConfig(**FROZEN)
    rec = run_on_features(cfg, bundle, run_dir=tmp_path / "run")
    probe, (val_x, val_y) = _fitted_probe(cfg, bundle)
    test_p, test_y = probe.predict_proba(bundle.features["test"]), bundle.labels["test"]
    fit = fit_temperature(
        logits_from_probabilities(probe.predict_proba(val_x), "multi-class"), val_y, "multi-class"
    )
    cal = rec["calibration"]
    assert cal["temperature"] == pytest.approx(fit.temperature, rel=1e-12)
    assert cal["val_nll_after"] == pytest.approx(fit.nll_after, rel=1e-12)
    assert cal["test"]["before"] == pytest.approx(
        calibration_metrics(test_p, test_y, "multi-class"), rel=1e-12
    )
    scaled = apply_temperature(
        logits_from_probabilities(test_p, "multi-class"), fit.temperature, "multi-class"
    )
    assert cal["test"]["after"] == pytest.approx(
        calibration_metrics(scaled, test_y, "multi-class"), rel=1e-12
    )
    assert cal["test"]["before"]["ece"] == pytest.approx(rec["metrics"]["test"]["ece"])
    assert (tmp_path / "run" / "reliability.png").exists() and cal["diagram"] == "reliability.png"


def test_a_method_that_uses_no_validation_labels_gets_no_temperature(bundle):
    rec = run_on_features(ExperimentConfig(**{**FROZEN, "method": "knn"}), bundle)
    cal = rec["calibration"]
    assert not cal["fitted"] and cal["temperature"] is None and "after" not in cal["test"]
    assert "uses no validation labels" in cal["reason"] and rec["labels_used"]["val"] == 0


def test_network_tta_on_a_probe_runs_the_backbone_on_the_test_images(bundle):
    cfg = ExperimentConfig(**FROZEN)
    probe, _ = _fitted_probe(cfg, bundle)
    source = bundle.source
    model = probe_model(probe, source.backbone, "test_cnn")
    batches = image_batches(source.images["test"], source.preprocess, 16)
    # no adaptation through the backbone: the probe's own probabilities on extracted features
    unadapted = create_tta("none").run(model, batches).probabilities
    np.testing.assert_allclose(unadapted, probe.predict_proba(bundle.features["test"]), atol=1e-5)
    rec = run_on_features(ExperimentConfig(**FROZEN, tta="bn", tta_batch_size=16), bundle)
    assert rec["tta"]["inputs"] == "images" and rec["tta"]["stats"]["batches"] == 7
    assert rec["metrics"]["test"] != run_on_features(cfg, bundle)["metrics"]["test"]


def test_slices_of_volumes_reach_tta_as_feature_extraction_embeds_them():
    from clinadapt.backbones import create_backbone
    from clinadapt.runner.common import make_preprocess

    cfg = ExperimentConfig(dataset="synthetic-3d", backbone="test_cnn", weights="none")
    backbone = create_backbone("test_cnn", "none").eval()
    preprocess = make_preprocess(backbone, cfg)
    volumes = load_dataset("synthetic-3d")["test"].images[:3]
    [batch] = image_batches(volumes, preprocess, 3, volume_mode="planes", max_slices=4)
    assert batch.shape[:3] == (3, 3, 12)
    with torch.no_grad():
        ours = SliceFeatures(backbone)(batch).numpy()
    theirs = extract_features(
        backbone,
        volumes,
        preprocess,
        precision="fp32",
        volume_mode="planes",
        max_slices=4,
        is_volume=True,
        progress=False,
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_trained_volume_run_adapts_slice_by_slice(tmp_path):
    from clinadapt.engine.batches import SliceMean

    cfg = ExperimentConfig(
        dataset="synthetic-3d",
        backbone="test_cnn",
        weights="none",
        method="full",
        shots="5",
        bootstrap=0,
        train={"epochs": 1, "batch_size": 8, "max_slices": 4},
        tta="bn",
        tta_batch_size=8,
    )
    rec = run_experiment(cfg, run_dir=tmp_path, progress=False)
    assert rec["tta"]["stats"]["examples"] == 100
    write_json_atomic(tmp_path / "record.json", rec)
    _, model, _, preprocess = load_run(tmp_path)
    [x] = image_batches(
        load_dataset("synthetic-3d")["test"].images[:2], preprocess, 2, volume_mode="axial"
    )
    with torch.no_grad():
        torch.testing.assert_close(trained_model(model, True)(x), SliceMean(model)(x))


def test_adaptive_output_temperature_follows_the_polynomial_and_spares_binary_outputs():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (200, 6)) * rng.choice([0.05, 3.0], (200, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out, sharpened = adaptive_output(probs, "multi-class")
    entropy = -(probs * np.log(probs)).sum(1)
    beta = np.where(entropy > 0.5, np.maximum(1.0, np.polyval(POLYNOMIAL, entropy)), 1.0)
    expected = np.exp(beta[:, None] * logits)
    np.testing.assert_allclose(out, expected / expected.sum(1, keepdims=True), atol=1e-12)
    assert sharpened == int((beta > 1).sum()) and 0 < sharpened < 200
    binary = probs[:, :2] / probs[:, :2].sum(1, keepdims=True)
    same, none_sharpened = adaptive_output(binary, "binary")
    assert none_sharpened == 0 and np.array_equal(same, binary)


def test_adaptive_temperature_is_a_recorded_no_op_on_a_binary_probe(tmp_path):
    options = {**FROZEN, "dataset": "synthetic-binary", "cache_dir": str(tmp_path)}
    bundle = prepare_features(ExperimentConfig(**options), progress=False)
    off = run_on_features(ExperimentConfig(**options), bundle)
    on = run_on_features(ExperimentConfig(**options, adaptive_temperature="output"), bundle)
    assert on["metrics"]["test"] == off["metrics"]["test"]
    assert on["adaptive_temperature"]["sharpened_test_examples"] == 0
    assert "no-op" in on["adaptive_temperature"]["note"]


def test_predict_with_tta_adapts_a_copy_as_the_run_did(trained, tmp_path):
    run = trained / "tent"
    before = folder_digest(run / "adapter")
    test = load_dataset("synthetic-multiclass")["test"]
    inputs = tmp_path / "test.npz"
    np.savez(inputs, images=np.asarray(test.images))
    outs = {}
    for name, extra in (("plain", []), ("tent", [*TENT[:4], "--tta-option", "lr=0.05"])):
        outs[name] = tmp_path / f"{name}.csv"
        args = ["predict", str(run), str(inputs), "--out", str(outs[name]), "--quiet", *extra]
        assert main(args) == 0
    probs = {
        name: np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows])
        for name, rows in ((n, list(csv.DictReader(p.open()))) for n, p in outs.items())
    }
    assert np.abs(probs["tent"] - probs["plain"]).max() > 1e-3
    # the same images, order, batches and seed as the run's evaluation: the same predictions
    metrics = task_for("multi-class").evaluate(test.labels, probs["tent"], "multi-class")
    assert metrics["acc"] == record(run)["metrics"]["test"]["acc"]
    assert metrics["auc"] == pytest.approx(record(run)["metrics"]["test"]["auc"], abs=1e-4)
    assert folder_digest(run / "adapter") == before


def test_predict_refuses_tta_options_without_tta_and_tta_on_segmentation_runs(
    trained, tmp_path, capsys
):
    args = ["predict", str(trained / "plain"), str(tmp_path), "--quiet"]
    assert main([*args, "--tta-mode", "continual"]) == 2
    assert "without --tta" in capsys.readouterr().err
    segmentation = tmp_path / "seg"
    segmentation.mkdir()
    (segmentation / "record.json").write_text(json.dumps({"task": "segmentation"}))
    assert main(["predict", str(segmentation), str(tmp_path), "--tta", "tent"]) == 2
    assert "classification runs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"dataset": "synthetic-multilabel", "tta": "tent"}, ConfigError, "multi-label"),
        ({"dataset": "kvasir_seg", "tta": "tent"}, ConfigError, "classification runs"),
        ({"dataset": "kvasir_seg", "adaptive_temperature": "output"}, ConfigError, "segments"),
        ({"backbone": "test_vit", "tta": "bn"}, ClinadaptError, "batch-norm|BatchNorm"),
        ({"adaptive_temperature": "attention"}, ConfigError, "Attention"),
    ],
)
def test_trained_runs_refuse_test_time_options_that_cannot_apply_before_training(
    tmp_path, options, error, pattern
):
    base = {**FROZEN, "method": "full", "train": {"epochs": 1}}
    cfg = ExperimentConfig(**{**base, **options})
    with pytest.raises(error, match=pattern):
        run_experiment(cfg, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_frozen_methods_without_a_linear_head_refuse_tta(tmp_path):
    cfg = ExperimentConfig(**{**FROZEN, "method": "knn"}, tta="tent")
    with pytest.raises(ConfigError, match="method linear"):
        run_experiment(cfg, progress=False)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"tta_mode": "continuous"}, "Did you mean 'continual'"),
        ({"adaptive_temperature": "outputs"}, "Did you mean 'output'"),
        ({"tta_options": {"lr": 0.1}}, "tta is 'none'"),
        ({"tta_batch_size": 0}, "tta_batch_size must be at least 1"),
    ],
)
def test_bad_test_time_options_fail_when_the_config_is_made(options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ExperimentConfig(**FROZEN, **options)


def test_report_shows_tta_and_calibration_with_reliability_diagrams(tmp_path):
    def grid(**base):
        return GridConfig(
            datasets=["synthetic-multiclass"],
            backbones=["test_cnn"],
            weights=["none"],
            methods=["linear"],
            shots=["10"],
            seeds=1,
            base={"bootstrap": 0, **base},
        )

    run_grid(grid(), tmp_path, progress=False)
    run_grid(grid(tta="lame"), tmp_path, progress=False)
    from clinadapt.runner.report import build_report

    paths = build_report(tmp_path)
    md = paths["markdown"].read_text()
    assert "| ECE | ECE after T |" in md and "tta=lame" in md and "tta=none" in md
    assert "## Reliability diagrams (test split)" in md
    copied = sorted((tmp_path / "report" / "reliability").iterdir())
    assert len(copied) == 2 and all(p.suffix == ".png" for p in copied)
    assert "reliability/" in paths["html"].read_text()
