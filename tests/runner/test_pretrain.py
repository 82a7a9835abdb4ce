"""``clinadapt pretrain`` end to end on synthetic data and tiny models: every method in 2D, two in
3D, continued pretraining through LoRA, exact resume, and the weights plugging into bench."""

import json

import pytest
import torch
from safetensors.torch import load_file

from clinadapt.backbones import create_backbone
from clinadapt.cli import main
from clinadapt.config import from_dict
from clinadapt.errors import ClinadaptError, ConfigError, DataError, UnknownNameError
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.pretrain import run_pretrain
from clinadapt.runner.records import read_records
from clinadapt.ssl.config import PretrainConfig
from clinadapt.ssl.loop import _Loop

SMALL = {
    "simclr": {"hidden_dim": 16, "out_dim": 8},
    "dino": {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8},
    "mae": {"decoder_dim": 16, "decoder_heads": 2, "decoder_depth": 1},
}


def _config(method="simclr", **options):
    values = {
        "data": "synthetic-binary",
        "backbone": "test_cnn",
        "method": method,
        "method_options": SMALL[method],
        "epochs": 2,
        "batch_size": 64,
        "lr": 1e-3,
        "monitor_max_train": 100,
        "precision": "fp32",
        "device": "cpu",
        **options,
    }
    return from_dict(PretrainConfig, values)


def _weights(run_dir):
    return load_file(run_dir / "backbone" / "model.safetensors")


@pytest.mark.parametrize(
    ("method", "backbone", "data"),
    [
        ("simclr", "test_cnn", "synthetic-binary"),
        ("dino", "test_cnn", "synthetic-binary"),
        ("mae", "test_vit", "synthetic-binary"),
        ("dino", "test_vit", "synthetic-binary"),  # multi-crop through a fixed-size timm ViT
        ("mae", "test_vit3d", "synthetic-3d"),
        ("simclr", "test_resnet3d", "synthetic-3d"),
    ],
)
def test_two_epochs_of_pretraining_give_weights_that_bench_accepts(
    tmp_path, method, backbone, data
):
    cfg = _config(method, backbone=backbone, data=data)
    record = run_pretrain(cfg, tmp_path / "run", progress=False)
    assert record["kind"] == "pretrain" and len(record["history"]) == 2
    assert all(row["loss"] == row["loss"] for row in record["history"])  # finite, not NaN
    assert 0 <= record["history"][-1]["knn_auc"] <= 1
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    trained = _weights(tmp_path / "run")
    start = create_backbone(backbone, "none").model.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start if k in trained)
    grid = GridConfig(
        datasets=[data],
        backbones=[backbone],
        weights=[record["output"]["weights"]],
        methods=["knn"],
        shots=["all"],
        seeds=1,
        base={"bootstrap": 0, "data_root": str(tmp_path)},
    )
    assert run_grid(grid, tmp_path / "bench", progress=False)["failed"] == 0
    (run_record,) = read_records(tmp_path / "bench")
    assert run_record["backbone"]["weights_id"] == record["output"]["sha256"]


def test_loaded_backbone_embeds_like_the_trained_encoder(tmp_path):
    run_pretrain(_config(epochs=1), tmp_path, progress=False)
    backbone = create_backbone("test_cnn", str(tmp_path / "backbone"))
    reference = create_backbone("test_cnn", "none")
    reference.model.load_state_dict(_weights(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(backbone.embed(x), reference.eval().embed(x))
    config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert config["architecture"] == "test_resnet"
    assert config["pretraining"]["method"] == "simclr"


def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(tmp_path, monkeypatch):
    run_pretrain(_config("dino"), tmp_path / "whole", progress=False)
    original = _Loop._train_epoch

    def stop_in_second_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(_Loop, "_train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(_config("dino"), tmp_path / "cut", progress=False)
    monkeypatch.setattr(_Loop, "_train_epoch", original)
    record = run_pretrain(_config("dino", resume=True), tmp_path / "cut", progress=False)
    assert [r["epoch"] for r in record["history"]] == [1, 2]
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    with pytest.raises(ConfigError, match="lr"):
        run_pretrain(_config("dino", resume=True, lr=0.5), tmp_path / "cut", progress=False)


def test_continued_pretraining_through_lora_changes_only_a_low_rank_part(tmp_path):
    run_pretrain(_config(epochs=1), tmp_path / "start", progress=False)
    start = str(tmp_path / "start" / "backbone")
    cfg = _config(weights=start, lora_rank=2, lr=1e-2, norm_statistics="frozen")
    record = run_pretrain(cfg, tmp_path / "lora", progress=False)
    assert record["method"]["lora_targets"]
    assert 0 < record["method"]["trainable_percent_of_backbone"] < 50
    before, after = _weights(tmp_path / "start"), _weights(tmp_path / "lora")
    assert set(before) == set(after)  # merged: a plain model, no LoRA tensors
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    for k in changed:  # each update W' - W has at most the LoRA rank
        delta = (after[k] - before[k]).flatten(1).double()
        assert torch.linalg.matrix_rank(delta, atol=1e-6) <= 2
    create_backbone("test_cnn", str(tmp_path / "lora" / "backbone"))


def test_a_diverging_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    from clinadapt.ssl.simclr import SimCLR

    monkeypatch.setattr(SimCLR, "forward", lambda self, views, epoch=0: torch.tensor(float("nan")))
    with pytest.raises(ClinadaptError, match="diverged"):
        run_pretrain(_config(), tmp_path, progress=False)


def test_bad_requests_fail_early_and_clearly(tmp_path):
    with pytest.raises(DataError, match="3D volumes"):
        run_pretrain(_config(data="synthetic-3d"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="Vision Transformer"):
        run_pretrain(_config("mae", backbone="test_cnn"), tmp_path / "b", progress=False)
    with pytest.raises(UnknownNameError, match="simclr"):
        run_pretrain(from_dict(PretrainConfig, {"method": "simclear"}), tmp_path / "d")
    with pytest.raises(ConfigError, match="colour"):
        run_pretrain(_config(view_options={"color": 0.5}), tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        _config(batch_size=1)


def test_cli_pretrain_writes_a_record_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "pretrain",
        "--data",
        "synthetic-binary",
        "--backbone",
        "test_cnn",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "1e-3",
        "--precision",
        "fp32",
        "--out",
        str(out),
        "--quiet",
        "method.hidden_dim=16",
        "views.blur=0",
    ]
    assert main(argv) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["method"]["config"]["hidden_dim"] == 16
    assert record["method"]["views"]["blur"] == 0
    assert "--weights" in capsys.readouterr().out
    assert main(argv) == 2
    assert "already holds" in capsys.readouterr().err


def test_a_flat_folder_of_nifti_volumes_pretrains_a_3d_backbone(tmp_path):
    """Unlabelled scans need no class sub-folders (e.g. MSD Hippocampus imagesTr/)."""
    import nibabel as nib
    import numpy as np

    scans = tmp_path / "imagesTr"
    scans.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        volume = rng.normal(size=(20 + i, 24, 18)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), scans / f"case_{i}.nii.gz")
    cfg = _config("mae", backbone="test_vit3d", data=str(scans), epochs=1, batch_size=4)
    record = run_pretrain(cfg, tmp_path / "run", progress=False)
    assert record["train_images"] == 6 and record["monitor"] is None
    assert record["data"][0]["provenance"]["source"] == str(scans)
    create_backbone("test_vit3d", str(tmp_path / "run" / "backbone"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_decided_on_the_pooled_images_and_recorded(tmp_path, monkeypatch, native):
    from clinadapt.engine import precision

    monkeypatch.setattr(precision, "bf16_supported", lambda device: native)
    record = run_pretrain(_config(precision="auto", epochs=1), tmp_path, progress=False)
    check = record["preprocessing"]["precision_check"]
    assert check["requested"] == "auto" and check["used"] == record["preprocessing"]["precision"]
    if native:
        assert check["probe_images"] == 64 and 0 < check["cosine_min"] <= 1
        assert check["used"] == ("bf16" if check["cosine_min"] >= 0.99 else "fp32")
    else:
        assert check["used"] == "fp32" and "not native" in check["reason"]


def _segmentation_folder(path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (path / sub).mkdir(parents=True)
    for i in range(12):
        size = (24 + i, 20 + i)  # cases of different sizes, as in real segmentation data
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            path / "images" / f"{i}.png"
        )
        mask = (rng.random(size) > 0.5).astype(np.uint8) * 255
        Image.fromarray(mask).save(path / "masks" / f"{i}.png")
    return path


def test_segmentation_images_pretrain_without_a_class_label_monitor(tmp_path):
    data = _segmentation_folder(tmp_path / "seg")
    cfg = _config(data=f"{data},synthetic-binary", epochs=1, batch_size=16)
    record = run_pretrain(cfg, tmp_path / "run", progress=False)
    assert record["monitor"] == "synthetic-binary"  # the first pooled dataset with classes
    alone = _config(data=str(data), epochs=1, batch_size=8)
    assert run_pretrain(alone, tmp_path / "alone", progress=False)["monitor"] is None
    with pytest.raises(ConfigError, match="needs class labels"):
        run_pretrain(
            _config(data=str(data), monitor=str(data), epochs=1, batch_size=8),
            tmp_path / "bad",
            progress=False,
        )
