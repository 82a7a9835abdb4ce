import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clinadapt.cli import main
from clinadapt.errors import ClinadaptError
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.export import export_run
from clinadapt.runner.predict import load_run, predict_files

LORA = [
    "--dataset",
    "synthetic-binary",
    "--backbone",
    "test_vit",
    "--weights",
    "none",
    "--method",
    "lora",
]
TRAIN = ["train.epochs=2", "train.batch_size=16", "bootstrap=20", "--quiet"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "lora"
    code = main(
        [
            "train",
            *LORA,
            "--shots",
            "20",
            "--out",
            str(run_dir),
            *TRAIN,
        ]
    )
    assert code == 0
    return run_dir


def test_training_record_states_costs(lora_run):
    rec = json.loads((lora_run / "record.json").read_text())
    assert rec["task"] == "classification"
    method = rec["method"]
    assert 0 < method["trainable_backbone_parameters"] < rec["backbone"]["parameters"]
    assert 0 < method["trainable_percent_of_backbone"] < 100
    assert method["adapter_bytes"] > 0
    assert rec["timings"]["time_per_epoch_s"] > 0 and rec["timings"]["train_s"] > 0
    speed = rec["timings"]["train_throughput"]
    assert speed["examples_per_s"] > 0 and speed["flops_per_example"] > 0
    assert rec["peak_memory_mb"] > 0
    assert len(rec["history"]) == 2
    assert 0 <= rec["metrics"]["test"]["auc"] <= 1
    # resize=auto is classification's nearest, and the record says which protocol that is
    assert rec["preprocessing"]["resize"] == "nearest"
    assert rec["preprocessing"]["note"].startswith("MedMNIST v2 protocol")
    assert method["head"] == "linear"


def test_train_refuses_to_overwrite_a_finished_run(lora_run, capsys):
    code = main(
        [
            "train",
            *LORA,
            "--out",
            str(lora_run),
            *TRAIN,
        ]
    )
    assert code == 2 and "already holds" in capsys.readouterr().err


def test_merged_export_loads_in_plain_timm_with_equal_outputs(lora_run, tmp_path):
    import timm
    from safetensors.torch import load_file

    out = export_run(lora_run, tmp_path / "merged", merge=True)
    config = json.loads((out / "config.json").read_text())
    plain = timm.create_model(config["architecture"], **config["create_model_kwargs"]).eval()
    plain.load_state_dict(load_file(out / "model.safetensors"))
    _, model, _, preprocess = load_run(lora_run)
    x = preprocess(np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-4)
    card = (out / "MODEL_CARD.md").read_text()
    assert "lora" in card and "Intended use" in card and "AUC" in card


def test_adapter_export_and_non_empty_target(lora_run, tmp_path):
    out = export_run(lora_run, tmp_path / "adapter")
    assert (out / "adapter.safetensors").exists() and (out / "MODEL_CARD.md").exists()
    with pytest.raises(ClinadaptError, match="not empty"):
        export_run(lora_run, out)


def test_predict_writes_probabilities_for_npz_and_images(lora_run, tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "new.npz"
    np.savez(npz, images=rng.integers(0, 255, (5, 28, 28), dtype=np.uint8))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")
    out = predict_files(lora_run, [str(npz), str(folder)], tmp_path / "p.csv", progress=False)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert {r["predicted"] for r in rows} <= set(
        json.loads((lora_run / "record.json").read_text())["dataset"]["labels"]
    )


def test_predict_errors_name_the_problem(lora_run, tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("hello")
    with pytest.raises(ClinadaptError, match="x.txt"):
        predict_files(lora_run, [str(bad)], tmp_path / "p.csv", progress=False)
    with pytest.raises(ClinadaptError, match="no record.json"):
        predict_files(tmp_path, [str(bad)], tmp_path / "p.csv", progress=False)


def test_bench_runs_finetune_methods_beside_frozen_ones(tmp_path):
    grid = GridConfig(
        datasets=["synthetic-binary"],
        backbones=["test_cnn"],
        weights=["none"],
        methods=["linear", "bitfit"],
        shots=["all"],
        seeds=1,
        base={"bootstrap": 0, "train": {"epochs": 1, "batch_size": 32}},
    )
    counts = run_grid(grid, tmp_path, progress=False)
    assert counts["done"] == 2, counts
    records = sorted(tmp_path.rglob("shots-all_seed-0_*.json"))
    kinds = {json.loads(p.read_text())["kind"] for p in records}
    assert kinds == {"frozen", "finetune"}
    assert run_grid(grid, tmp_path, progress=False)["skipped"] == 2


def test_training_record_run_time_covers_training(lora_run):
    rec = json.loads((lora_run / "record.json").read_text())
    assert rec["timings"]["run_s"] >= rec["timings"]["train_s"] > 0
    assert rec["timings"]["setup_s"] > 0 and rec["kind"] == "finetune"


@pytest.mark.parametrize("backbone", ["test_resnet3d", "test_cnn"])
def test_volume_run_predicts_nifti_and_npz(tmp_path, backbone):
    nib = pytest.importorskip("nibabel")
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            "synthetic-3d",
            "--backbone",
            backbone,
            "--weights",
            "none",
            "--method",
            "full",
            "--shots",
            "5",
            "--out",
            str(run_dir),
            *TRAIN,
        ]
    )
    assert code == 0
    rng = np.random.default_rng(0)
    volume = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(20, 24, 22)).astype(np.float32), np.eye(4)), volume)
    npz = tmp_path / "vols.npz"
    np.savez(npz, images=rng.integers(0, 255, (2, 28, 28, 28), dtype=np.uint8))
    out = predict_files(run_dir, [str(volume), str(npz)], tmp_path / "p.csv", progress=False)
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["source"] == str(volume) and len(rows) == 3
    image = tmp_path / "slice.png"
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(image)
    with pytest.raises(ClinadaptError, match="trained on volumes"):
        predict_files(run_dir, [str(image)], tmp_path / "q.csv", progress=False)


def _bitfit(tmp_path, name, **kw):
    from clinadapt.runner.experiment import ExperimentConfig, run_experiment

    options = dict(
        dataset="synthetic-binary",
        backbone="test_cnn",
        weights="none",
        method="full",
        shots="10",
        bootstrap=0,
        train={"epochs": 1, "batch_size": 8},
    )
    options.update(kw)
    return run_experiment(ExperimentConfig(**options), run_dir=tmp_path / name, progress=False)


def test_same_seed_gives_the_same_numbers(tmp_path):
    torch.manual_seed(123)  # whatever the global generator holds before the run
    first = _bitfit(tmp_path, "a")
    torch.manual_seed(456)
    second = _bitfit(tmp_path, "b")
    assert first["metrics"]["test"] == second["metrics"]["test"]


def test_run_options_carry_over_to_training_or_are_refused(tmp_path):
    from clinadapt.errors import ConfigError
    from clinadapt.runner.common import train_config
    from clinadapt.runner.experiment import ExperimentConfig

    cfg = ExperimentConfig(method="lora", precision="fp32", batch_size=4, max_slices=3)
    resolved = train_config(cfg)
    assert (resolved.precision, resolved.batch_size, resolved.max_slices) == ("fp32", 4, 3)
    with pytest.raises(ConfigError, match="disagree"):
        train_config(ExperimentConfig(method="lora", batch_size=4, train={"batch_size": 8}))
    with pytest.raises(ConfigError, match="axial"):
        _bitfit(tmp_path, "c", dataset="synthetic-3d", volume_mode="coronal")
