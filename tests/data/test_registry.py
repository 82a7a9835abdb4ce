import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinadapt.data import DATASETS, TaskType, load_dataset, resolve_root
from clinadapt.errors import ChecksumWarning, ConfigError, DataError, UnknownNameError

TASKS = {
    "binary-class": TaskType.BINARY,
    "multi-class": TaskType.MULTICLASS,
    "multi-label, binary-class": TaskType.MULTILABEL,
    "ordinal-regression": TaskType.ORDINAL,
}


def test_records_agree_with_medmnist_info():
    from medmnist.info import INFO

    assert set(DATASETS.names("*mnist*")) == set(INFO)
    for name, raw in INFO.items():
        info = DATASETS.get(name)
        three_d = name.endswith("3d")
        sizes = (28, 64) if three_d else (28, 64, 128, 224)
        assert info.task is TASKS[raw["task"]], name
        assert info.labels == tuple(raw["label"][str(i)] for i in range(len(raw["label"])))
        assert info.channels == raw["n_channels"]
        assert info.ndim == (3 if three_d else 2)
        assert info.splits == raw["n_samples"]
        assert info.sizes == sizes
        for s in sizes:
            key = "" if s == 28 else f"_{s}"
            assert info.urls[s] == raw[f"url{key}"]
            assert info.md5[s] == raw[f"MD5{key}"]
        assert info.description == raw["description"]
        assert info.license == raw["license"]
        assert info.modality


def test_synthetic_names_are_registered():
    names = {"synthetic-binary", "synthetic-multiclass", "synthetic-multilabel", "synthetic-3d"}
    assert names <= set(DATASETS.names("synthetic-*"))
    assert DATASETS.get("synthetic-3d").ndim == 3


def test_import_neither_imports_medmnist_nor_writes(tmp_path):
    code = (
        "import sys, clinadapt.data; "
        "assert 'medmnist' not in sys.modules, 'medmnist imported'; "
        "clinadapt.data.resolve_root()"
    )
    env = {**os.environ, "HOME": str(tmp_path), "CLINADAPT_CACHE": str(tmp_path / "c")}
    env.pop("CLINADAPT_DATA", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="breastmnist"):
        load_dataset("breastmnst")


def test_missing_path_and_wrong_file_kind(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nothing.csv"))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(DataError, match="neither a folder"):
        load_dataset(str(other))


def test_resolve_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    default = resolve_root()
    assert default == tmp_path / ".cache" / "clinadapt" / "medmnist"
    assert not default.exists()
    monkeypatch.setenv("CLINADAPT_DATA", str(tmp_path / "env"))
    assert resolve_root() == tmp_path / "env"
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"


def test_missing_file_without_download_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINADAPT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="CLINADAPT_DATA") as err:
        load_dataset("breastmnist", download=False)
    assert str(tmp_path / "breastmnist.npz") in str(err.value)


def test_unreleased_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\[28, 64\]"):
        load_dataset("adrenalmnist3d", root=tmp_path, size=224)


def test_synthetic_by_name_is_seeded():
    a = load_dataset("synthetic-binary")
    b = load_dataset("synthetic-binary", seed=1)
    assert a.info.name == "synthetic-binary"
    assert a["train"].images.shape == (200, 28, 28)
    assert a.provenance["source"] == "synthetic" and a.provenance["seed"] == 0
    assert not np.array_equal(a["train"].images, b["train"].images)
    assert load_dataset("synthetic-multiclass", size=64)["val"].images.shape == (50, 64, 64)


def _shared_listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.shared
def test_real_breastmnist_checksum_mismatch_is_reported(shared_medmnist):
    before = _shared_listing(shared_medmnist)
    with pytest.warns(ChecksumWarning, match="breastmnist.npz") as record:
        ds = load_dataset("breastmnist", root=shared_medmnist, download=False)
    message = str(record[0].message)
    assert "750601b1f35ba3300ea97c75c52ff8f6" in message and ds.provenance["md5"] in message
    assert ds.provenance["verified"] is False
    assert ds["train"].labels.shape == (546, 1) and ds["train"].labels.dtype == np.int64
    assert ds["train"].images.shape == (546, 28, 28)
    assert _shared_listing(shared_medmnist) == before  # read-only folder: cache went elsewhere


@pytest.mark.shared
def test_real_retinamnist_and_adrenalmnist3d_verify(shared_medmnist):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChecksumWarning)
        retina = load_dataset("retinamnist", root=shared_medmnist, download=False)
        adrenal = load_dataset("adrenalmnist3d", root=shared_medmnist, download=False)
    assert retina.provenance["verified"] is True
    assert retina["test"].images.shape == (400, 28, 28, 3)
    assert retina.info.task is TaskType.ORDINAL
    assert adrenal.provenance["verified"] is True
    assert adrenal["train"].images.shape == (1188, 28, 28, 28)
    assert json.dumps(adrenal.provenance)  # provenance goes into JSON run records


def test_segmentation_datasets_are_registered_and_found_under_the_root(tmp_path):
    for name, classes in (("kvasir_seg", 2), ("dsb2018_nuclei", 2), ("hippocampus_msd", 3)):
        info = DATASETS.get(name)
        assert info.task is TaskType.SEGMENTATION and info.num_classes == classes
        assert info.labels[0] == "background" and info.splits == {}
    with pytest.raises(DataError, match=r"kvasir_seg not found: no folder .*CLINADAPT_DATA"):
        load_dataset("kvasir_seg", root=tmp_path)
    for i in range(10):
        for part in ("images", "masks"):
            (tmp_path / "kvasir_seg" / part).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 5), 255 * (i % 2), dtype=np.uint8)).save(
                tmp_path / "kvasir_seg" / part / f"{i}.png"
            )
    ds = load_dataset("kvasir_seg", root=tmp_path)
    assert ds.info.name == "kvasir_seg" and ds.info.labels == ("background", "polyp")
    assert len(ds["train"]) == 7
