"""Shifted test sets: the grammar, corrupted sets (seeded, cached), resolution shifts and the
user's own target data. A fake corruption table stands in for medmnistc here."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinadapt.data.corruptions import INSTALL, _medmnistc, cell_seed
from clinadapt.data.info import TaskType
from clinadapt.data.medmnist import load_medmnist
from clinadapt.data.shifts import (
    Concatenated,
    ShiftedSplit,
    apply_shift,
    canonical_shift,
    expand_shifts,
    parse_shift,
    shifted_test_split,
)
from clinadapt.data.transforms import VolumePreprocess
from clinadapt.errors import ClinadaptError, ConfigError, DataError

from . import fake_corruptions
from .toy import toy_info


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, int]]:
    return fake_corruptions.install(monkeypatch)


@pytest.fixture
def toy(tmp_path, write_npz):
    """A grey MedMNIST-like dataset named toymnist with 6 test images at 28 px."""
    write_npz(tmp_path / "data" / "toymnist.npz")
    return load_medmnist(toy_info(), tmp_path / "data", 28)


# Grammar ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        (None, "none"),
        (" None ", "none"),
        ("MedMNISTC:Gaussian_Noise:3", "medmnistc:gaussian_noise:3"),
        ("medmnistc:all:2-2", "medmnistc:all:2"),
        ("medmnistc: all : 1-5", "medmnistc:all:1-5"),
        ("size:64", "size:64"),
    ],
)
def test_canonical_spelling(spec, canonical):
    assert canonical_shift(spec) == canonical


def test_a_target_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical_shift("target:site_b") == f"target:{tmp_path / 'site_b'}"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("medmnist:pixelate:1", "Did you mean 'medmnistc'"),
        ("noise", "not a kind of shift"),
        ("medmnistc:pixelate", "medmnistc:<corruption or all>"),
        ("medmnistc::3", "medmnistc:<corruption or all>"),
        ("medmnistc:pixelate:6", "severity must be 1-5"),
        ("medmnistc:pixelate:0", "severity must be 1-5"),
        ("medmnistc:pixelate:5-1", "severity must be 1-5"),
        ("medmnistc:pixelate:high", "severity must be 1-5"),
        ("size:big", "positive integer"),
        ("size:", "needs an argument"),
        ("none:1", "takes no argument"),
    ],
)
def test_bad_specs_say_what_to_write(spec, says):
    with pytest.raises(ConfigError, match=says):
        parse_shift(spec)


# Corrupted test sets --------------------------------------------------------------------------


def test_a_corrupted_set_keeps_shape_labels_and_records_how_it_was_made(toy, calls, tmp_path):
    split = shifted_test_split(toy, "medmnistc:fake_noise:3", cache_dir=tmp_path / "c")
    clean = np.asarray(toy["test"].images)
    assert isinstance(split, ShiftedSplit)
    assert split.images.shape == clean.shape and split.images.dtype == np.uint8
    assert not np.array_equal(split.images, clean)
    np.testing.assert_array_equal(split.labels, toy["test"].labels)
    assert calls == [("n", 3)] * 6
    prov = split.provenance
    assert prov["spec"] == "medmnistc:fake_noise:3" and prov["seed"] == 0 and prov["size"] == 28
    assert prov["blocks"] == [
        {
            "corruption": "fake_noise",
            "severity": 3,
            "start": 0,
            "stop": 6,
            "sha256": prov["blocks"][0]["sha256"],
        }
    ]


def test_grey_images_go_through_rgb_and_back(toy, monkeypatch, tmp_path):
    seen = []

    def record(image, severity, rng):
        seen.append(image.mode)
        return np.asarray(image)

    table = fake_corruptions.table([])
    table["toymnist"]["fake_noise"] = table["toymnist"]["fake_noise"].__class__(
        "fake_noise", (1,) * 5, (1,) * 5, record
    )
    from clinadapt.data import corruptions

    monkeypatch.setattr(corruptions, "corruption_table", lambda: table)
    split = shifted_test_split(toy, "medmnistc:fake_noise:1", cache_dir=tmp_path / "c")
    assert set(seen) == {"RGB"}
    np.testing.assert_array_equal(split.images, toy["test"].images)  # identity stays identity


def test_the_second_call_reads_the_cache(toy, calls, tmp_path):
    first = shifted_test_split(toy, "medmnistc:fake_noise:2", cache_dir=tmp_path / "c")
    assert len(calls) == 6
    second = shifted_test_split(toy, "medmnistc:fake_noise:2", cache_dir=tmp_path / "c")
    assert len(calls) == 6  # nothing recomputed
    np.testing.assert_array_equal(first.images, second.images)
    assert first.provenance == second.provenance


def test_a_damaged_cache_entry_is_rebuilt(toy, calls, tmp_path, caplog):
    first = np.array(
        shifted_test_split(toy, "medmnistc:fake_noise:2", cache_dir=tmp_path / "c").images
    )
    (npy,) = (tmp_path / "c").glob("*.npy")
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = shifted_test_split(toy, "medmnistc:fake_noise:2", cache_dir=tmp_path / "c")
    assert "fails its checksum" in caplog.text and len(calls) == 12
    np.testing.assert_array_equal(again.images, first)
    npy.write_bytes(b"not an array")
    shifted_test_split(toy, "medmnistc:fake_noise:2", cache_dir=tmp_path / "c")
    assert len(calls) == 18 and "unreadable" in caplog.text


def test_the_default_cache_lives_under_the_cache_home(toy, calls, monkeypatch, tmp_path):
    monkeypatch.setenv("CLINADAPT_CACHE", str(tmp_path / "home"))
    shifted_test_split(toy, "medmnistc:fake_noise:1")
    assert len(list((tmp_path / "home" / "shifts").glob("*.json"))) == 1


def test_seeded_sets_repeat_and_leave_the_global_generators_alone(toy, calls, tmp_path):
    np.random.seed(123)
    random.seed(123)
    before = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    a = shifted_test_split(toy, "medmnistc:fake_noise:4", seed=1, cache_dir=tmp_path / "a")
    assert (np.random.random(), random.random()) == before
    b = shifted_test_split(toy, "medmnistc:fake_noise:4", seed=1, cache_dir=tmp_path / "b")
    c = shifted_test_split(toy, "medmnistc:fake_noise:4", seed=2, cache_dir=tmp_path / "a")
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert len(calls) == 18  # seed 2 is its own cache entry


def test_each_cell_has_its_own_seed():
    seeds = {cell_seed(0, "breastmnist", c, s) for c in ("a", "b") for s in (1, 2)}
    assert len(seeds) == 4 and cell_seed(0, "x", "a", 1) == cell_seed(0, "x", "a", 1)


def test_all_severities_make_one_set_and_leave_out_what_cannot_run(toy, calls, tmp_path):
    split = shifted_test_split(toy, "medmnistc:all:2-5", cache_dir=tmp_path / "c")
    prov = split.provenance
    cells = [(b["corruption"], b["severity"]) for b in prov["blocks"]]
    assert cells == [("fake_noise", s) for s in (2, 3, 4, 5)] + [
        ("fake_marks", 2),
        ("fake_marks", 3),
    ]
    assert prov["left_out"] == {"fake_marks": [4, 5]}
    assert len(split) == 36 and split.images.shape == (36, 28, 28)
    np.testing.assert_array_equal(split.labels, np.tile(toy["test"].labels, (6, 1)))
    single = shifted_test_split(toy, "medmnistc:fake_marks:3", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(split.images[30:36], single.images)
    assert len(calls) == 36  # the single set came from the cache of the union


def test_expand_lists_the_single_sets(calls):
    assert expand_shifts("toymnist", "medmnistc:all:3-4") == [
        "medmnistc:fake_noise:3",
        "medmnistc:fake_noise:4",
        "medmnistc:fake_marks:3",
    ]
    assert expand_shifts("toymnist", "medmnistc:all:4", size=40)[-1] == "medmnistc:fake_marks:4"
    assert expand_shifts("toymnist", "size:64") == ["size:64"]


def test_unknown_corruption_and_unsupported_dataset_say_what_exists(toy, calls):
    with pytest.raises(ConfigError, match="Did you mean 'fake_noise'"):
        shifted_test_split(toy, "medmnistc:fake_noize:2")
    with pytest.raises(ConfigError, match="defines no corruptions for 'octmnist3d'.*toymnist"):
        expand_shifts("octmnist3d", "medmnistc:all:1")


def test_a_named_corruption_that_does_not_fit_the_size_is_refused(toy, calls):
    with pytest.raises(ConfigError, match="at least 40 px; this run reads 28 px.*\\[1, 2, 3\\]"):
        shifted_test_split(toy, "medmnistc:fake_marks:3-4")
    assert calls == []


def test_volumes_and_segmentation_cannot_be_corrupted(tmp_path, write_npz, calls):
    write_npz(tmp_path / "toymnist.npz", ndim=3)
    volumes = load_medmnist(toy_info(ndim=3), tmp_path, 28)
    with pytest.raises(ConfigError, match="corrupts 2D images"):
        shifted_test_split(volumes, "medmnistc:fake_noise:1")
    from dataclasses import replace

    seg = replace(volumes, info=replace(volumes.info, task=TaskType.SEGMENTATION))
    with pytest.raises(ConfigError, match="for classification"):
        shifted_test_split(seg, "size:64")


def test_synthetic_data_is_corrupted_too(calls, tmp_path):
    from clinadapt.data import load_dataset

    ds = load_dataset("synthetic-binary", size=32)
    split = shifted_test_split(ds, "medmnistc:fake_noise:1", cache_dir=tmp_path)
    assert split.images.shape == (100, 32, 32) and len(calls) == 100


def test_a_missing_medmnistc_names_the_install_steps(monkeypatch):
    import importlib

    def missing(name):
        raise ImportError("MagickWand shared library not found.")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ClinadaptError) as err:
        _medmnistc()
    text = str(err.value)
    assert INSTALL in text and "clinadapt[shift]" in text and "--no-deps medmnistc" in text
    assert "MagickWand shared library not found" in text


def test_concatenated_reads_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 255, (n, 4, 4), dtype=np.uint8) for n in (3, 1, 5)]
    joined, whole = Concatenated(parts), np.concatenate(parts)
    assert len(joined) == 9 and joined.shape == (9, 4, 4) and joined.dtype == np.uint8
    for index in (0, 3, 8, -1, slice(2, 7), np.array([8, 0, 3, 3]), np.arange(9)):
        np.testing.assert_array_equal(joined[index], whole[index])


# Resolution shift -----------------------------------------------------------------------------


def test_size_shift_reads_the_other_release_and_preprocessing_brings_it_to_the_model(
    tmp_path, write_npz
):
    write_npz(tmp_path / "toymnist.npz", ndim=3, size=28)
    write_npz(tmp_path / "toymnist_64.npz", ndim=3, size=64, seed=1)
    ds = load_medmnist(toy_info(ndim=3), tmp_path, 28)
    split = shifted_test_split(ds, "size:64")
    assert split.images.shape == (6, 64, 64, 64)
    big = load_medmnist(toy_info(ndim=3), tmp_path, 64)
    np.testing.assert_array_equal(split.images, big["test"].images)
    np.testing.assert_array_equal(split.labels, big["test"].labels)
    prov = split.provenance
    assert prov["size"] == 64 and prov["run_size"] == 28
    assert prov["source"] == str(tmp_path / "toymnist_64.npz") and prov["md5"]
    x = VolumePreprocess(28, 0.0, 1.0)(np.array(split.images[:2]))  # the trained model's input
    assert tuple(x.shape) == (2, 1, 28, 28, 28)


def test_size_shift_errors(tmp_path, write_npz):
    write_npz(tmp_path / "toymnist.npz", ndim=3)
    ds = load_medmnist(toy_info(ndim=3), tmp_path, 28)
    with pytest.raises(ConfigError, match="already reads toymnist at size 28"):
        shifted_test_split(ds, "size:28")
    with pytest.raises(ConfigError, match="not released at size 128"):
        shifted_test_split(ds, "size:128")
    with pytest.raises(DataError, match="toymnist_64.npz does not exist"):
        load_medmnist(toy_info(ndim=3), tmp_path, 64, download=False)
    from clinadapt.data import load_dataset

    with pytest.raises(ConfigError, match="comes from synthetic"):
        shifted_test_split(load_dataset("synthetic-binary"), "size:64")


# The user's own target data -------------------------------------------------------------------


def png(path: Path, shape=(40, 36), mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (*shape, 3) if mode == "RGB" else shape, dtype=np.uint8)
    Image.fromarray(data).save(path)


def target_folder(root: Path, classes: dict[str, int], mode: str = "RGB") -> Path:
    for name, n in classes.items():
        for i in range(n):
            png(root / name / f"{i}.png", mode=mode, seed=i)
    return root


def test_a_target_folder_is_read_like_the_trained_data(toy, tmp_path):
    folder = target_folder(tmp_path / "site_b", {"C1": 7, "c0": 5})  # colour, 40x36, any case
    split = shifted_test_split(toy, f"target:{folder}")
    assert split.images.shape == (12, 28, 28) and split.images.dtype == np.uint8  # grey, 28 px
    assert sorted(np.asarray(split.labels)[:, 0].tolist()) == [0] * 5 + [1] * 7
    assert split.labels.dtype == np.int64 and split.labels.shape == (12, 1)
    first = split.images.paths[0]
    assert first.parent.name == "C1" and split.labels[0, 0] == 1
    prov = split.provenance
    assert prov["classes"] == {"C1": 1, "c0": 0} and prov["channels_found"] == 3
    assert prov["read_as"] == {"size": 28, "channels": 1, "ndim": 2} and prov["md5"]
    assert prov["source"] == str(folder) and prov["splits_given"] is False


def test_integer_class_names_are_class_indices(toy, tmp_path):
    folder = target_folder(tmp_path / "t", {"0": 6, "1": 6}, mode="L")
    split = shifted_test_split(toy, f"target:{folder}")
    assert split.provenance["classes"] == {"0": 0, "1": 1}


def test_a_target_with_splits_contributes_its_test_split(toy, tmp_path):
    target_folder(tmp_path / "t" / "train", {"c0": 4, "c1": 4})
    target_folder(tmp_path / "t" / "test", {"c0": 2, "c1": 3})
    split = shifted_test_split(toy, f"target:{tmp_path / 't'}")
    assert len(split) == 5 and split.provenance["splits_given"] is True
    assert all(p.parts[-3] == "test" for p in split.images.paths)


def test_a_target_manifest(toy, tmp_path):
    for i in range(12):
        png(tmp_path / "img" / f"{i}.png", mode="L", seed=i)
    rows = [f"img/{i}.png,{'c1' if i % 3 else 'c0'}" for i in range(12)]
    (tmp_path / "t.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    split = shifted_test_split(toy, f"target:{tmp_path / 't.csv'}")
    assert len(split) == 12 and split.images[0].shape == (28, 28)
    expected = {f"{i}.png": int(bool(i % 3)) for i in range(12)}
    got = {p.name: int(y) for p, y in zip(split.images.paths, split.labels[:, 0], strict=True)}
    assert got == expected


def test_a_multilabel_dataset_takes_single_label_targets_as_one_hot(tmp_path, write_npz):
    write_npz(tmp_path / "d" / "toymnist.npz", multilabel=True, num_classes=3)
    ds = load_medmnist(toy_info(task=TaskType.MULTILABEL, num_classes=3), tmp_path / "d", 28)
    folder = target_folder(tmp_path / "t", {"c2": 6, "c0": 6})
    labels = np.asarray(shifted_test_split(ds, f"target:{folder}").labels)
    assert labels.shape == (12, 3) and labels.sum(axis=1).tolist() == [1] * 12
    assert labels[:, 1].sum() == 0 and labels[:, 2].sum() == 6


def test_target_errors_name_the_problem(toy, tmp_path):
    folder = target_folder(tmp_path / "t", {"c0": 6, "cl": 6})
    with pytest.raises(DataError, match="class 'cl' is neither a class of toymnist.*'c1'"):
        shifted_test_split(toy, f"target:{folder}")
    with pytest.raises(DataError, match="give an image folder"):
        shifted_test_split(toy, f"target:{tmp_path / 'missing'}")
    nib = pytest.importorskip("nibabel")
    vols = tmp_path / "vols"
    for name in ("c0", "c1"):
        for i in range(6):
            (vols / name).mkdir(parents=True, exist_ok=True)
            nib.save(
                nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)),
                vols / name / f"{i}.nii",
            )
    with pytest.raises(DataError, match="holds 3D volumes but toymnist holds 2D images"):
        shifted_test_split(toy, f"target:{vols}")


# Recording ------------------------------------------------------------------------------------


def test_apply_shift_records_the_shift_and_keeps_the_other_splits(toy, calls, tmp_path):
    clean = apply_shift(toy, "none")
    assert clean.provenance["shift"] == {"spec": "none", "kind": "none"}
    assert clean["test"] is toy["test"]
    shifted = apply_shift(toy, "medmnistc:fake_noise:1", cache_dir=tmp_path)
    assert shifted["train"] is toy["train"] and isinstance(shifted["test"], ShiftedSplit)
    assert shifted.provenance["shift"]["spec"] == "medmnistc:fake_noise:1"
    assert shifted.provenance["md5"] == toy.provenance["md5"] and "shift" not in toy.provenance
