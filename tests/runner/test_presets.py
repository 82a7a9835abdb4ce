import json

from clinadapt.runner.presets import find_local_weights, quickstart


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
