from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinadapt.data import TaskType, load_dataset
from clinadapt.data.lazy import load_image
from clinadapt.data.local import load_image_folder, load_manifest
from clinadapt.errors import DataError

SIZE = 16


def png(path: Path, shape=(20, 24), value: int | None = None, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    shape = (*shape, 3) if mode == "RGB" else shape
    data = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value)
    Image.fromarray(data.astype(np.uint8)).save(path)
    return path


def folder_dataset(root: Path, counts: dict[str, int], mode: str = "L") -> Path:
    for name, n in counts.items():
        for i in range(n):
            png(root / name / f"{name}_{i}.png", shape=(20 + i % 3, 24), mode=mode)
    return root


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# Image folders ------------------------------------------------------------------------------


def test_image_folder_with_automatic_split(tmp_path):
    root = folder_dataset(tmp_path / "xray", {"normal": 30, "pneumonia": 20})
    ds = load_dataset(str(root), image_size=SIZE)
    assert ds.info.name == "xray" and ds.info.task is TaskType.BINARY
    assert ds.info.labels == ("normal", "pneumonia") and ds.info.channels == 1
    assert ds.info.splits == {"train": 35, "val": 5, "test": 10}
    train = ds["train"]
    batch = train.images[np.arange(4)]
    assert batch.shape == (4, SIZE, SIZE) and batch.dtype == np.uint8
    assert train.images.shape == (35, SIZE, SIZE) and train.images[0].shape == (SIZE, SIZE)
    for path, label in zip(train.images.paths, train.labels[:, 0], strict=True):
        assert path.parent.name == ds.info.labels[label]
    assert np.bincount(ds["test"].labels[:, 0]).tolist() == [6, 4]  # stratified


def test_colour_and_given_train_test_layout(tmp_path):
    folder_dataset(tmp_path / "d" / "train", {"a": 16, "b": 16, "c": 16}, mode="RGB")
    folder_dataset(tmp_path / "d" / "test", {"a": 2, "b": 2, "c": 2}, mode="RGB")
    ds = load_image_folder(tmp_path / "d", image_size=SIZE)
    assert ds.info.task is TaskType.MULTICLASS and ds.info.channels == 3
    assert ds.info.splits == {"train": 42, "val": 6, "test": 6}
    assert all("/test/" in str(p) for p in ds["test"].images.paths)
    assert ds["val"].images[[0, 1]].shape == (2, SIZE, SIZE, 3)
    assert ds.provenance["splits_given"] is True


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    data = np.linspace(0, 4000, 20 * 20).reshape(20, 20).astype(np.uint16)
    folder = tmp_path / "d"
    for i in range(10):
        for cls in ("a", "b"):
            (folder / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(data).save(folder / cls / f"{i}.png")
    image = load_image_folder(folder, image_size=20)["train"].images[0]
    assert image.min() == 0 and image.max() == 255


def test_float_image_with_nan_is_named(tmp_path):
    data = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    data[3, 3] = np.nan
    Image.fromarray(data, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan\.tif: .*NaN"):
        load_image(tmp_path / "nan.tif", size=SIZE, channels=1)


def test_provenance_says_how_intensities_were_scaled(tmp_path):
    ds = load_image_folder(folder_dataset(tmp_path / "d", {"a": 10, "b": 10}), image_size=SIZE)
    assert "16-bit" in ds.provenance["intensity"] and "8-bit" in ds.provenance["intensity"]


def test_empty_class_and_no_classes(tmp_path):
    root = folder_dataset(tmp_path / "d", {"a": 10})
    (root / "b").mkdir()
    with pytest.raises(DataError, match=r"d/b holds no images"):
        load_image_folder(root)
    (tmp_path / "flat").mkdir()
    png(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "flat")


def test_corrupt_image_is_named_on_read_and_when_sampled(tmp_path):
    root = folder_dataset(tmp_path / "d", {"a": 10, "b": 10})
    ds = load_image_folder(root, image_size=SIZE)
    bad = ds["train"].images.paths[2]
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=bad.name):
        ds["train"].images[[0, 1, 2]]
    with pytest.raises(DataError, match="a_0.png"):  # the first file is read for its channels
        (root / "a" / "a_0.png").write_bytes(b"")
        load_image_folder(root, image_size=SIZE)


# CSV manifests ------------------------------------------------------------------------------


def test_manifest_with_names_relative_paths_and_given_splits(tmp_path):
    rows = []
    for i in range(12):
        png(tmp_path / "img" / f"{i}.png")
        split = "train" if i < 8 else "val" if i < 10 else "test"
        rows.append(f"img/{i}.png,{['cyst', 'tumour', 'normal'][i % 3]},{split}")
    ds = load_dataset(str(write_csv(tmp_path / "m.csv", "path,label,split", rows)), image_size=8)
    assert ds.info.labels == ("cyst", "normal", "tumour")
    assert ds.info.splits == {"train": 8, "val": 2, "test": 2}
    assert ds["train"].labels[:4, 0].tolist() == [0, 2, 1, 0]
    assert ds["test"].images[:].shape == (2, 8, 8)


def test_manifest_integer_and_multilabel(tmp_path):
    for i in range(20):
        png(tmp_path / f"{i}.png")
    ints = write_csv(tmp_path / "i.csv", "path,label", [f"{i}.png,{i % 3}" for i in range(20)])
    ds = load_manifest(ints, image_size=8)
    assert ds.info.labels == ("0", "1", "2")
    multi = ["a|b", "b", "", "c|a"] * 5
    ml = write_csv(tmp_path / "ml.csv", "path,label", [f"{i}.png,{m}" for i, m in enumerate(multi)])
    ds = load_manifest(ml, image_size=8)
    assert ds.info.task is TaskType.MULTILABEL and ds.info.labels == ("a", "b", "c")
    everything = np.concatenate([s.labels for s in ds.splits.values()])
    assert everything.shape == (20, 3) and everything.sum(axis=0).tolist() == [10, 10, 5]


def test_patient_grouping_keeps_patients_in_one_split(tmp_path):
    rng = np.random.default_rng(0)
    rows, patient_of = [], {}
    for patient in range(60):
        label = "sick" if patient % 3 == 0 else "well"
        for scan in range(int(rng.integers(1, 5))):
            name = f"p{patient}_{scan}.png"
            png(tmp_path / name, shape=(4, 4))
            rows.append(f"{name},{label},p{patient}")
            patient_of[name] = f"p{patient}"
    csv = write_csv(tmp_path / "m.csv", "path,label,patient_id", rows)
    ds = load_manifest(csv, image_size=4)
    split_of: dict[str, str] = {}
    for split, part in ds.splits.items():
        for path in part.images.paths:
            assert split_of.setdefault(patient_of[path.name], split) == split, "patient leaked"
    assert sum(ds.info.splits.values()) == len(rows)
    assert 0.6 < ds.info.splits["train"] / len(rows) < 0.8
    overall = np.mean([r.split(",")[1] == "well" for r in rows])
    for part in ds.splits.values():
        assert abs(part.labels.mean() - overall) < 0.15  # class balance roughly kept


def test_seed_changes_split_and_fingerprint(tmp_path):
    for i in range(30):
        png(tmp_path / f"{i}.png")
    csv = write_csv(tmp_path / "m.csv", "path,label", [f"{i}.png,{i % 2}" for i in range(30)])
    a, b, c = (load_manifest(csv, image_size=8, seed=s) for s in (0, 0, 1))
    assert a["test"].images.paths == b["test"].images.paths
    assert a.provenance["md5"] == b.provenance["md5"] != c.provenance["md5"]
    png(tmp_path / "0.png", shape=(30, 30))  # a changed file changes the fingerprint
    assert load_manifest(csv, image_size=8).provenance["md5"] != a.provenance["md5"]


@pytest.mark.parametrize(
    ("header", "row", "pattern"),
    [
        ("path,label", "missing.png,a", r"line 2: .*missing.png does not exist"),
        ("path,label", ",a", r"line 2: the path is empty"),
        ("path,label,split", "0.png,a,tset", "Did you mean 'test'"),
        ("path,label,split", "0.png,a,", "split is empty"),
        ("path,label", "0.png,", "label is empty"),
        ("path,lable", "0.png,a", "columns path,label"),
        ("path,label,patient_id", "0.png,a,", "patient_id is empty"),
    ],
)
def test_bad_manifest_rows(tmp_path, header, row, pattern):
    png(tmp_path / "0.png")
    csv = write_csv(tmp_path / "m.csv", header, [row])
    with pytest.raises(DataError, match=pattern):
        load_manifest(csv)


def test_bad_manifest_contents(tmp_path):
    png(tmp_path / "0.png")
    cases = {
        "one class": ("path,label", ["0.png,a"] * 12, "at least 2"),
        "gap": ("path,label", ["0.png,0", "0.png,2"] * 6, r"classes \[1\] have no examples"),
        "few": ("path,label", ["0.png,a", "0.png,b"] * 3, "at least 10"),
        "no test": ("path,label,split", ["0.png,a,train", "0.png,b,train"], "test split is empty"),
        "leak": (
            "path,label,split,patient_id",
            ["0.png,a,train,p1", "0.png,b,test,p1"] + ["0.png,a,train,p2"] * 8,
            "patient 'p1' appears in both",
        ),
    }
    for name, (header, rows, pattern) in cases.items():
        with pytest.raises(DataError, match=pattern):
            load_manifest(write_csv(tmp_path / f"{name}.csv", header, rows))


def test_a_file_in_two_given_splits_is_refused(tmp_path):
    for i in range(12):
        png(tmp_path / f"{i}.png")
    rows = [f"{i}.png,{'ab'[i % 2]},{'train' if i < 8 else 'test'}" for i in range(12)]
    rows += ["./0.png,a,test", "img/../3.png,b,val", "1.png,b,train"]  # same split: harmless
    (tmp_path / "img").mkdir()
    with pytest.raises(DataError, match=r"2 files .* more than one split") as err:
        load_manifest(write_csv(tmp_path / "m.csv", "path,label,split", rows))
    message = str(err.value)
    assert "0.png (train, test)" in message and "3.png (train, val)" in message
    assert "1.png" not in message and "m.csv" in message


def test_a_file_listed_twice_without_splits_is_refused(tmp_path):
    for i in range(20):
        png(tmp_path / f"{i}.png")
    rows = [f"{i}.png,{i % 2}" for i in range(20)] + ["5.png,1"]
    with pytest.raises(DataError, match=r"m\.csv: 1 file is listed more than once: 5\.png"):
        load_manifest(write_csv(tmp_path / "m.csv", "path,label", rows))


def test_mixing_images_and_volumes_is_refused(tmp_path):
    png(tmp_path / "0.png")
    (tmp_path / "v.nii.gz").write_bytes(b"")
    rows = ["0.png,a", "v.nii.gz,b"] * 6
    with pytest.raises(DataError, match="mixes 2D images"):
        load_manifest(write_csv(tmp_path / "m.csv", "path,label", rows))


def test_unlabelled_folder_reads_every_file_as_training_data(tmp_path):
    from PIL import Image

    from clinadapt.data.local import load_unlabelled_folder

    (tmp_path / "nested").mkdir()
    for i, where in enumerate([tmp_path, tmp_path, tmp_path / "nested"]):
        Image.fromarray(np.full((10, 12), 40 * i, dtype=np.uint8)).save(where / f"{i}.png")
    dataset = load_unlabelled_folder(tmp_path, image_size=8)
    assert list(dataset.splits) == ["train"] and len(dataset["train"]) == 3
    assert dataset["train"].images[np.array([0, 2])].shape == (2, 8, 8)
    assert dataset.info.ndim == 2 and dataset.provenance["source"] == str(tmp_path)
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match="mixes"):
        load_unlabelled_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        load_unlabelled_folder(empty)
