import json

import pytest

from clinadapt.errors import ClinadaptError
from clinadapt.runner.presets import (
    MEDMNIST_V2_PUBLISHED,
    find_local_weights,
    medmnist_v2,
    quickstart,
)


def test_quickstart_falls_back_with_notices_when_offline(tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", _offline)
    preset = quickstart(data_root=str(tmp_path), weights_root=str(tmp_path))
    assert preset.grid.datasets == ["synthetic-binary"]
    assert preset.grid.weights == ["none"]
    assert len(preset.notices) == 2
    assert all("smoke test" in n for n in preset.notices)


def test_quickstart_uses_local_weights_beside_the_control(tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", _offline)
    folder = tmp_path / "mnv2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "mobilenetv2_100"}))
    (folder / "model.safetensors").write_bytes(b"")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{not json")
    assert find_local_weights("mobilenetv2_100", tmp_path) == folder
    assert find_local_weights("resnet18", tmp_path) is None
    preset = quickstart(data_root=str(tmp_path), weights_root=str(tmp_path))
    assert preset.grid.weights == [str(folder), "none"]
    assert preset.grid.methods == ["knn", "prototype", "linear"]
    assert preset.grid.shots == ["1", "5", "10", "all"] and preset.grid.seeds == 3


def _offline(*args, **kwargs):
    raise OSError("network is unreachable")


def test_medmnist_v2_preset_follows_the_paper_recipe():
    presets = medmnist_v2(data_root="/data")
    assert {p.grid.datasets[0] for p in presets} == {d for d, _ in MEDMNIST_V2_PUBLISHED}
    adrenal = next(p for p in presets if p.grid.datasets == ["adrenalmnist3d"])
    assert sorted(adrenal.grid.backbones) == ["resnet18_2_5d", "resnet18_3d"]
    train = presets[0].grid.base["train"]
    assert (train["epochs"], train["batch_size"], train["optimizer"], train["lr"]) == (
        100,
        128,
        "adam",
        0.001,
    )
    assert (train["schedule"], train["milestones"], train["gamma"]) == ("step", [50, 75], 0.1)
    assert presets[0].grid.weights == ["none"] and presets[0].grid.methods == ["full"]
    assert not presets[0].notices
    assert presets[0].grid.seeds == 1
    short = medmnist_v2(datasets=["breastmnist"], epochs=3, seeds=3)
    assert short[0].grid.base["train"]["epochs"] == 3 and "not a faithful" in short[0].notices[0]
    assert short[0].grid.seeds == 3
    with pytest.raises(ClinadaptError, match="no published baseline"):
        medmnist_v2(datasets=["pathmnist"])
