import hashlib
import io
import json
import urllib.error
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from clinadapt.data import files
from clinadapt.data.info import TaskType
from clinadapt.data.medmnist import SIBLING_CACHE, load_medmnist, npz_name
from clinadapt.data.transforms import Preprocess
from clinadapt.errors import ChecksumWarning, DataError
from clinadapt.paths import cache_home

from .toy import toy_arrays, toy_info


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_file_names():
    assert npz_name("breastmnist", 28) == "breastmnist.npz"
    assert npz_name("breastmnist", 64) == "breastmnist_64.npz"


def test_reads_memory_mapped_and_normalises_labels(tmp_path, write_npz):
    arrays = toy_arrays()
    arrays["train_labels"] = arrays["train_labels"][:, 0]  # (N,) as in re-saved copies
    write_npz(tmp_path / "toymnist.npz", arrays)
    ds = load_medmnist(toy_info(), tmp_path, 28)
    train = ds["train"]
    assert isinstance(train.images, np.memmap)
    np.testing.assert_array_equal(train.images, arrays["train_images"])
    assert train.labels.shape == (6, 1) and train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.labels[:, 0], arrays["train_labels"])
    assert ds.provenance == {
        "source": str(tmp_path / "toymnist.npz"),
        "md5": md5(tmp_path / "toymnist.npz"),
        "expected_md5": None,
        "verified": None,
        "size": 28,
    }
    assert (tmp_path / SIBLING_CACHE / ds.provenance["md5"] / "train_images.npy").is_file()


def test_size_64_and_colour_and_multilabel(tmp_path, write_npz):
    write_npz(tmp_path / "toymnist_64.npz", size=64, channels=3)
    ds = load_medmnist(toy_info(channels=3), tmp_path, 64)
    assert ds["val"].images.shape == (6, 64, 64, 3) and ds.size == 64
    write_npz(tmp_path / "ml" / "toymnist.npz", multilabel=True, num_classes=4)
    info = toy_info(task=TaskType.MULTILABEL, num_classes=4)
    assert load_medmnist(info, tmp_path / "ml", 28)["test"].labels.shape == (6, 4)


def test_checksum_match_and_mismatch(tmp_path, write_npz):
    path = write_npz(tmp_path / "toymnist.npz")
    good = load_medmnist(toy_info(md5={28: md5(path)}), tmp_path, 28)
    assert good.provenance["verified"] is True
    with pytest.warns(ChecksumWarning) as record:
        bad = load_medmnist(toy_info(md5={28: "0" * 32}), tmp_path, 28)
    message = str(record[0].message)
    assert str(path) in message and "0" * 32 in message and md5(path) in message
    assert bad.provenance["verified"] is False and bad.provenance["expected_md5"] == "0" * 32


def test_read_only_folder_caches_in_user_cache(tmp_path, write_npz, monkeypatch):
    folder = tmp_path / "ro"
    path = write_npz(folder / "toymnist.npz")
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLINADAPT_CACHE", str(cache))
    folder.chmod(0o555)
    try:
        ds = load_medmnist(toy_info(), folder, 28)
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == ["toymnist.npz"]
    assert (cache / "arrays" / md5(path) / "test_labels.npy").is_file()
    assert len(ds["test"]) == 6


def test_changed_file_is_extracted_again(tmp_path, write_npz):
    write_npz(tmp_path / "toymnist.npz", seed=0)
    first = load_medmnist(toy_info(), tmp_path, 28)
    arrays = toy_arrays(seed=1)
    write_npz(tmp_path / "toymnist.npz", arrays)
    second = load_medmnist(toy_info(), tmp_path, 28)
    assert first.provenance["md5"] != second.provenance["md5"]
    np.testing.assert_array_equal(second["train"].images, arrays["train_images"])


def test_damaged_cache_is_rebuilt(tmp_path, write_npz):
    write_npz(tmp_path / "toymnist.npz")
    ds = load_medmnist(toy_info(), tmp_path, 28)
    (tmp_path / SIBLING_CACHE / ds.provenance["md5"] / "val_images.npy").unlink()
    assert len(load_medmnist(toy_info(), tmp_path, 28)["val"]) == 6


def test_truncated_and_garbage_files(tmp_path, write_npz):
    path = write_npz(tmp_path / "toymnist.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"toymnist\.npz.*(truncated|corrupt)"):
        load_medmnist(toy_info(), tmp_path, 28)
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"toymnist\.npz"):
        load_medmnist(toy_info(), tmp_path, 28)


def test_corrupt_member_is_detected(tmp_path, write_npz):
    arrays = toy_arrays(n=200)
    path = tmp_path / "toymnist.npz"
    np.savez(path, **arrays)  # stored, not compressed: flip a byte inside an array
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"toymnist\.npz"):
        load_medmnist(toy_info(), tmp_path, 28)


def test_missing_arrays_are_named(tmp_path, write_npz):
    arrays = toy_arrays()
    del arrays["val_labels"]
    write_npz(tmp_path / "toymnist.npz", arrays)
    with pytest.raises(DataError, match="val_labels"):
        load_medmnist(toy_info(), tmp_path, 28)


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("train_images", np.zeros((6, 28, 28, 3), np.uint8), r"train_images has shape"),
        ("train_images", np.zeros((6, 32, 32), np.uint8), r"\(N, 28, 28\)"),
        ("val_images", np.zeros((5, 28, 28), np.uint8), "5 images but val_labels holds 6"),
        ("test_images", np.zeros((6, 28, 28), np.int32), "dtype int32"),
        ("train_labels", np.full((6, 1), 2, np.uint8), "label 2 at index 0 is outside 0..1"),
        ("train_labels", np.full((6, 1), -1, np.int64), "label -1"),
        ("train_labels", np.zeros((6, 2), np.uint8), r"needs \(N,\) or \(N, 1\)"),
        ("train_labels", np.full((6, 1), 0.5), "must be integers"),
    ],
)
def test_bad_arrays_are_rejected(tmp_path, write_npz, key, value, pattern):
    arrays = toy_arrays()
    arrays[key] = value
    write_npz(tmp_path / "toymnist.npz", arrays)
    with pytest.raises(DataError, match=pattern) as err:
        load_medmnist(toy_info(), tmp_path, 28)
    assert "toymnist.npz" in str(err.value)


def test_nan_pixels_are_rejected(tmp_path, write_npz):
    arrays = toy_arrays()
    images = arrays["test_images"].astype(np.float32) / 255
    images[4, 3, 3] = np.nan
    arrays["test_images"] = images
    write_npz(tmp_path / "toymnist.npz", arrays)
    with pytest.raises(DataError, match=r"test_images: image 4 has NaN"):
        load_medmnist(toy_info(), tmp_path, 28)


def test_float_pixels_outside_unit_range_are_rejected(tmp_path, write_npz):
    arrays = toy_arrays()
    arrays["val_images"] = arrays["val_images"].astype(np.float32)  # 0..255 floats
    write_npz(tmp_path / "toymnist.npz", arrays)
    with pytest.raises(DataError, match=r"toymnist\.npz: val_images: float pixels range from"):
        load_medmnist(toy_info(), tmp_path, 28)


def test_big_endian_arrays_are_read_in_native_byte_order(tmp_path, write_npz):
    arrays = toy_arrays()
    expected = {k: v.copy() for k, v in arrays.items()}
    arrays["train_images"] = (arrays["train_images"] / 255).astype(">f4")
    arrays["train_labels"] = arrays["train_labels"].astype(">u2")
    arrays["test_labels"] = arrays["test_labels"].astype(">i8")
    write_npz(tmp_path / "toymnist.npz", arrays)
    ds = load_medmnist(toy_info(), tmp_path, 28)
    train = ds["train"].images
    assert train.dtype == np.float32 and train.dtype.isnative and isinstance(train, np.memmap)
    np.testing.assert_array_equal(train, expected["train_images"] / np.float32(255))
    np.testing.assert_array_equal(ds["test"].labels, expected["test_labels"])
    batch = Preprocess(28, (0.5,), (0.5,))(train[:2])
    assert torch.isfinite(batch).all()


def test_multilabel_values_must_be_binary(tmp_path, write_npz):
    arrays = toy_arrays(multilabel=True, num_classes=3)
    arrays["val_labels"][2, 1] = 2
    write_npz(tmp_path / "toymnist.npz", arrays)
    with pytest.raises(DataError, match="row 2"):
        load_medmnist(toy_info(task=TaskType.MULTILABEL, num_classes=3), tmp_path, 28)
    arrays["val_labels"] = arrays["val_labels"][:, :2]
    write_npz(tmp_path / "toymnist.npz", arrays)
    with pytest.raises(DataError, match=r"expected \(N, 3\)"):
        load_medmnist(toy_info(task=TaskType.MULTILABEL, num_classes=3), tmp_path, 28)


def test_3d_shape_is_checked(tmp_path, write_npz):
    write_npz(tmp_path / "toymnist.npz", ndim=3)
    assert load_medmnist(toy_info(ndim=3), tmp_path, 28)["train"].images.shape == (6, 28, 28, 28)
    write_npz(tmp_path / "toymnist.npz")  # 2D images where the record says volumes
    with pytest.raises(DataError, match="volumes"):
        load_medmnist(toy_info(ndim=3), tmp_path, 28)


# Downloads ----------------------------------------------------------------------------------


def test_download_from_file_url(tmp_path, write_npz):
    source = write_npz(tmp_path / "remote" / "toymnist.npz")
    info = toy_info(urls={28: source.as_uri()}, md5={28: md5(source)})
    root = tmp_path / "data"
    ds = load_medmnist(info, root, 28)
    assert ds.provenance["verified"] is True
    assert sorted(p.name for p in root.iterdir()) == [SIBLING_CACHE, "toymnist.npz"]


def test_download_with_wrong_md5_keeps_nothing(tmp_path, write_npz):
    source = write_npz(tmp_path / "remote" / "toymnist.npz")
    info = toy_info(urls={28: source.as_uri()}, md5={28: "f" * 32})
    root = tmp_path / "data"
    with pytest.raises(DataError, match="not the official"):
        load_medmnist(info, root, 28)
    assert list(root.iterdir()) == []


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(files, "urlopen", offline)
    info = toy_info(urls={28: "https://example.org/toymnist.npz"})
    with pytest.raises(DataError) as err:
        load_medmnist(info, tmp_path, 28)
    message = str(err.value)
    assert "no route to host" in message and "CLINADAPT_DATA" in message
    assert "--data-root" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_removes_the_partial_file(tmp_path, monkeypatch):
    class Interrupted(io.BytesIO):
        headers: ClassVar[dict] = {}

        def read(self, n=-1):
            if self.tell() > 0:
                raise KeyboardInterrupt
            return super().read(4)

    monkeypatch.setattr(files, "urlopen", lambda url, timeout: Interrupted(b"x" * 100))
    with pytest.raises(KeyboardInterrupt):
        load_medmnist(toy_info(urls={28: "https://example.org/t.npz"}), tmp_path, 28)
    assert list(tmp_path.iterdir()) == []


def test_no_download_when_disabled(tmp_path):
    info = toy_info(urls={28: "https://example.org/toymnist.npz"})
    with pytest.raises(DataError, match="downloading is off"):
        load_medmnist(info, tmp_path, 28, download=False)


def test_md5_of_large_files_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MEMO_MIN_BYTES", 0)
    path = tmp_path / "big.bin"
    path.write_bytes(b"abc")
    real = files.md5_file(path)
    memo = next((cache_home() / "md5").glob("*.json"))
    memo.write_text(json.dumps({**json.loads(memo.read_text()), "md5": "remembered"}))
    assert files.md5_file(path) == "remembered"
    path.write_bytes(b"abcd")  # size and mtime change: hashed again
    assert files.md5_file(path) not in ("remembered", real)
