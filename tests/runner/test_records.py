import json
import math

import numpy as np
import pytest

from clinadapt.runner.records import RECORD_VERSION, read_records, write_json_atomic


def test_records_are_valid_json_with_nan_as_null(tmp_path):
    path = tmp_path / "a" / "rec.json"
    write_json_atomic(
        path,
        {"record_version": RECORD_VERSION, "auc": math.nan, "n": np.int64(3), "x": np.float32(0.5)},
    )
    data = json.loads(path.read_text())
    assert data["auc"] is None and data["n"] == 3 and data["x"] == 0.5
    assert not list(path.parent.glob("*.tmp"))


def test_failed_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "rec.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_read_records_skips_foreign_and_broken_files(tmp_path):
    write_json_atomic(tmp_path / "ok.json", {"record_version": RECORD_VERSION})
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    records = read_records(tmp_path)
    assert len(records) == 1 and records[0]["_path"].endswith("ok.json")


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    write_json_atomic(tmp_path / "rec.json", {"record_version": RECORD_VERSION})
    assert not (tmp_path / "rec.json").exists()
    monkeypatch.setenv("RANK", "0")
    write_json_atomic(tmp_path / "rec.json", {"record_version": RECORD_VERSION})
    assert (tmp_path / "rec.json").exists()
