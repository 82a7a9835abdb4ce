"""``clinadapt predict`` inputs: the pixel contract, byte order, damaged files, no stray files."""

import csv

import numpy as np
import pytest
from PIL import Image

from clinadapt.cli import main
from clinadapt.errors import DataError
from clinadapt.runner.predict import iter_inputs, predict_files

IMAGES_2D = {"size": 28, "channels": 1, "ndim": 2}


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "cnn"
    args = ["--dataset", "synthetic-binary", "--backbone", "test_cnn", "--weights", "none"]
    options = ["train.epochs=1", "train.batch_size=16", "bootstrap=0", "--quiet"]
    args += ["--method", "full", "--shots", "5", "--out", str(run_dir)]
    code = main(["train", *args, *options])
    assert code == 0
    return run_dir


def npz(path, images):
    np.savez(path, images=images)
    return str(path)


def read_all(path, **kw):
    return list(iter_inputs([path], **{**IMAGES_2D, **kw}))


@pytest.mark.parametrize(
    ("images", "pattern"),
    [
        (np.full((2, 28, 28), 200.0, np.float32), r"float pixels range from 200 to 200"),
        (np.linspace(-1, 1, 2 * 28 * 28).reshape(2, 28, 28), r"range from -1 to 1"),
        (np.zeros((2, 28, 28), np.uint16), r"dtype uint16"),
        (np.zeros((2, 28, 28), np.int16), r"dtype int16"),
    ],
)
def test_npz_images_must_follow_the_pixel_contract(tmp_path, images, pattern):
    path = npz(tmp_path / "new.npz", images)
    with pytest.raises(DataError, match=pattern) as err:
        read_all(path)
    assert "new.npz" in str(err.value)


def test_big_endian_npz_is_read_in_native_byte_order(tmp_path):
    images = np.linspace(0, 1, 3 * 28 * 28).reshape(3, 28, 28).astype(">f4")
    items = read_all(npz(tmp_path / "be.npz", images))
    assert items[0][0].endswith("be.npz:images[0]")
    assert all(image.dtype.isnative for _, image in items)
    np.testing.assert_array_equal(np.stack([image for _, image in items]), images)


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"",
        lambda raw: raw[: len(raw) // 2],
        lambda raw: raw[:-30],
        lambda raw: b"PK\x03\x04" + b"\x00" * 40,
    ],
    ids=["empty", "half", "no-directory-end", "bad-header"],
)
def test_damaged_npz_is_a_data_error(tmp_path, damage):
    path = tmp_path / "new.npz"
    np.savez_compressed(path, images=np.zeros((40, 28, 28), np.uint8))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match="new.npz"):
        read_all(str(path))


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, images=np.array([np.zeros((28, 28)), "x"], dtype=object))
    with pytest.raises(DataError, match="obj.npz"):
        read_all(str(path))


def test_a_failing_input_leaves_no_partial_csv(cnn_run, tmp_path):
    good = npz(tmp_path / "good.npz", np.zeros((3, 28, 28), np.uint8))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"")
    out = tmp_path / "out" / "p.csv"
    with pytest.raises(DataError, match="bad.npz"):
        predict_files(cnn_run, [good, str(bad)], out, batch_size=2, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert predict_files(cnn_run, [good], out, progress=False) == out
    assert list(out.parent.iterdir()) == [out]


def test_uint8_and_float_inputs_are_not_batched_together(cnn_run, tmp_path):
    rng = np.random.default_rng(0)
    png = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(png)
    floats = npz(tmp_path / "f.npz", rng.random((2, 28, 28), dtype=np.float32))
    alone = read_rows(predict_files(cnn_run, [str(png)], tmp_path / "a.csv", progress=False))
    mixed = predict_files(cnn_run, [str(png), floats], tmp_path / "m.csv", progress=False)
    assert read_rows(mixed)[0] == alone[0]


def read_rows(path):
    return list(csv.DictReader(path.open()))


def test_cli_writes_the_csv_of_a_classification_run(cnn_run, tmp_path, monkeypatch, capsys):
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(cnn_run), str(png), "--quiet"]) == 0
    assert "predictions written to predictions.csv" in capsys.readouterr().out
    [row] = read_rows(tmp_path / "predictions.csv")
    assert row["source"] == str(png) and "predicted" in row
