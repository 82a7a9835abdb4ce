import json
import math
import os

import numpy as np
import pytest

from clinadapt.errors import ConfigError
from clinadapt.runner.records import (
    RECORD_VERSION,
    check_writable,
    package_versions,
    read_records,
    write_bytes_atomic,
    write_json_atomic,
)


def test_package_versions_are_read_once_and_each_caller_gets_its_own_copy(monkeypatch):
    from importlib import metadata

    torch_version = metadata.version("torch")
    first = package_versions()
    assert first["torch"] == torch_version
    monkeypatch.setattr(metadata, "version", lambda name: pytest.fail("metadata read again"))
    first["torch"] = "changed by a caller"
    assert package_versions()["torch"] == torch_version


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


def test_interrupted_byte_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "mask.png"
    write_bytes_atomic(path, b"old")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_records_get_the_mode_the_umask_allows(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "rec.json", {"record_version": RECORD_VERSION})
    finally:
        os.umask(old)
    assert (tmp_path / "rec.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_check_writable_accepts_new_and_existing_targets(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "rec.json", "record file") == (
        tmp_path / "a" / "b" / "rec.json"
    )
    assert check_writable(tmp_path, "run folder", folder=True) == tmp_path
    assert not (tmp_path / "a").exists()  # checking creates nothing


def test_check_writable_names_the_blocking_path(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"file.txt is a file, not a folder"):
        check_writable(blocker / "x" / "rec.json", "record file")
    with pytest.raises(ConfigError, match=r"file.txt is a file, not a folder"):
        check_writable(blocker, "run folder", folder=True)
    with pytest.raises(ConfigError, match=r"is a folder, not a file"):
        check_writable(tmp_path, "record file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_refuses_read_only_folders(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            check_writable(tmp_path / "new" / "rec.json", "record file")
    finally:
        tmp_path.chmod(0o755)
