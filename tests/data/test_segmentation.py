import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinadapt.data import TaskType, few_shot_cases, load_dataset
from clinadapt.data.lazy import CaseSource
from clinadapt.data.seg_files import read_instances
from clinadapt.data.segmentation import count_empty_masks, load_segmentation
from clinadapt.errors import ConfigError, DataError

nib = pytest.importorskip("nibabel")


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def mask_array(i: int, shape=(12, 16), value: int = 255) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    if i % 4:  # every fourth case has no foreground
        m[2 : 4 + i % 5, 3:9] = value
    return m


def pairs_folder(root: Path, n: int = 20, value: int = 255, suffix: str = ".png") -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        save(root / "images" / f"c{i:02d}.jpg", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        save(root / "masks" / f"c{i:02d}{suffix}", mask_array(i, value=value))
    return root


def dsb_folder(root: Path, n: int = 12) -> Path:
    for i in range(n):
        case = root / "stage1_train" / f"id{i:02d}"
        save(case / "images" / f"id{i:02d}.png", np.full((10, 14, 4), 40 + i, dtype=np.uint8))
        for k in range(i % 3):
            m = np.zeros((10, 14), dtype=np.uint8)
            m[k * 3 : k * 3 + 2, 2:6] = 255
            save(case / "masks" / f"m{k}.png", m)
        (case / "masks").mkdir(exist_ok=True)
    return root


def nifti(path: Path, array: np.ndarray, affine=None, zooms=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*(zooms or (1.0, 1.0, 1.0)), 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def msd_folder(root: Path, n: int = 12, labels: dict | None = None) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        image = rng.integers(0, 1000, (6, 7, 5)).astype(np.int16)
        label = np.zeros((6, 7, 5), dtype=np.uint8)
        label[1:3, 2:4, 1:3] = 1 + i % 2
        nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", image, zooms=(0.5, 0.8, 2.0))
        nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, zooms=(0.5, 0.8, 2.0))
    if labels is not None:
        (root / "dataset.json").write_text(json.dumps({"labels": labels, "modality": {"0": "MRI"}}))
    return root


# Layouts ------------------------------------------------------------------------------------


def test_image_mask_pairs_0_255_masks_are_thresholded(tmp_path):
    ds = load_dataset(str(pairs_folder(tmp_path / "polyps")))
    assert ds.info.task is TaskType.SEGMENTATION and ds.info.task.single_label
    assert ds.info.labels == ("background", "foreground") and ds.info.num_classes == 2
    assert ds.info.channels == 3 and ds.info.ndim == 2
    assert ds.info.splits == {"train": 14, "val": 2, "test": 4} and len(ds["train"]) == 14
    train = ds["train"]
    assert isinstance(train.images, CaseSource) and isinstance(train.labels, CaseSource)
    image, mask = train.images[0], train.labels[0]
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    assert mask.shape == (12, 16) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    meta = train.meta[0]
    assert meta["source"].endswith(f"{meta['id']}.jpg") and meta["mask"].endswith(".png")
    assert meta["spacing"] is None and meta["shape"] == (12, 16)
    expected = (mask_array(int(meta["id"][1:])) >= 128).astype(np.uint8)
    assert (mask == expected).all()
    assert [m.shape for m in train.labels[:3]] == [(12, 16)] * 3
    assert "128" in ds.provenance["mask_encoding"] and ds.provenance["split_by"] == "case"
    assert count_empty_masks(ds) == ds.provenance["empty_masks"]
    assert sum(ds.provenance["empty_masks"].values()) == 5


def test_split_is_seeded_and_disjoint(tmp_path):
    root = pairs_folder(tmp_path / "p")
    ids = {
        s: [m["id"] for m in load_segmentation(root, seed=3)[s].meta]
        for s in ("train", "val", "test")
    }
    again = {s: [m["id"] for m in load_segmentation(root, seed=3)[s].meta] for s in ids}
    other = [m["id"] for m in load_segmentation(root, seed=4)["test"].meta]
    assert ids == again and other != ids["test"]
    assert sorted(i for v in ids.values() for i in v) == [f"c{i:02d}" for i in range(20)]


def test_index_masks_and_declared_labels(tmp_path):
    root = pairs_folder(tmp_path / "p", value=2)
    ds = load_dataset(str(root))
    assert ds.info.labels == ("background", "1", "2")
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "c": 3}})
    )
    ds = load_dataset(str(root))
    assert ds.info.labels == ("background", "a", "b", "c")
    assert int(max(m.max() for m in ds["train"].labels[:])) == 2


def test_patient_manifest_keeps_patients_in_one_split(tmp_path):
    root = pairs_folder(tmp_path / "p", n=40)
    rows = [f"c{i:02d},p{i // 2}" for i in range(40)]
    (root / "cases.csv").write_text("id,patient_id\n" + "\n".join(rows) + "\n")
    ds = load_dataset(str(root))
    assert ds.provenance["split_by"] == "patient"
    patients = {s: {int(m["id"][1:]) // 2 for m in ds[s].meta} for s in ("train", "val", "test")}
    assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]


def test_dsb2018_union_and_instances(tmp_path):
    ds = load_dataset(str(dsb_folder(tmp_path / "dsb")))
    assert ds.info.labels == ("background", "nucleus") and ds.info.channels == 3
    split = ds["train"]
    for i, meta in enumerate(split.meta):
        mask, image = split.labels[i], split.images[i]
        assert image.shape == (10, 14, 3) and mask.shape == (10, 14)
        count = int(meta["id"][2:]) % 3
        assert len(meta["instances"]) == count
        instances = read_instances(meta["instances"], meta["shape"])
        assert instances.max() == count and ((instances > 0) == (mask == 1)).all()
        assert mask.sum() == 8 * count


def test_msd_volumes_keep_spacing_affine_and_labels(tmp_path):
    root = msd_folder(tmp_path / "Task99", labels={"0": "background", "1": "front", "2": "back"})
    ds = load_dataset(str(root))
    assert ds.info.ndim == 3 and ds.info.channels == 1 and ds.info.modality == "MRI"
    assert ds.info.labels == ("background", "front", "back")
    split = ds["test"]
    image, label = split.images[0], split.labels[0]
    assert image.shape == label.shape == (5, 7, 6)  # file (i, j, k) reversed
    assert image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1
    assert set(np.unique(label)) <= {0, 1, 2} and label.dtype == np.uint8
    meta = split.meta[0]
    assert meta["spacing"] == (2.0, 0.8, 0.5) and meta["shape"] == (5, 7, 6)
    assert np.allclose(meta["affine"], np.diag([0.5, 0.8, 2.0, 1.0]))
    stored = np.asarray(nib.load(meta["mask"]).dataobj)
    assert (label.transpose(2, 1, 0) == stored).all()
    assert "percentiles" in ds.provenance["intensity"]


def test_msd_labels_inferred_without_dataset_json(tmp_path):
    ds = load_dataset(str(msd_folder(tmp_path / "m")))
    assert ds.info.labels == ("background", "1", "2")


def test_few_shot_cases_samples_training_cases():
    picked = few_shot_cases(14, 5, seed=0)
    assert len(picked) == 5 and len(set(picked)) == 5 and picked.max() < 14
    assert (picked == np.sort(picked)).all() and (few_shot_cases(14, 5, 0) == picked).all()
    assert not (few_shot_cases(14, 5, 1) == picked).all()
    assert (few_shot_cases(14, "all", 0) == np.arange(14)).all()
    with pytest.raises(DataError, match="only 14 cases"):
        few_shot_cases(14, 15, 0)
    with pytest.raises(ConfigError):
        few_shot_cases(14, 0, 0)


# Bad input ----------------------------------------------------------------------------------


def test_size_mismatch_names_both_files(tmp_path):
    root = pairs_folder(tmp_path / "p")
    save(root / "masks" / "c03.png", np.zeros((12, 15), dtype=np.uint8))
    with pytest.raises(DataError, match=r"c03\.png is 12x15 but its image .*c03\.jpg is 12x16"):
        load_dataset(str(root))


def test_missing_mask_and_orphan_mask(tmp_path):
    root = pairs_folder(tmp_path / "p")
    (root / "masks" / "c05.png").unlink()
    with pytest.raises(DataError, match=r"c05\.jpg has no mask"):
        load_dataset(str(root))
    save(root / "masks" / "c05.png", mask_array(5))
    save(root / "masks" / "extra.png", mask_array(5))
    with pytest.raises(DataError, match=r"extra\.png"):
        load_dataset(str(root))


def read_all(root: Path) -> None:
    """Open a dataset and read every mask: an error may come at either step (masks sampled on
    opening are read then)."""
    for split in load_dataset(str(root)).splits.values():
        split.labels[:]


def test_mask_values_outside_declared_labels(tmp_path):
    root = pairs_folder(tmp_path / "p", value=1)
    (root / "dataset.json").write_text('{"labels": {"0": "background", "1": "lesion"}}')
    save(root / "masks" / "c07.png", mask_array(7, value=3))
    with pytest.raises(DataError, match=r"c07\.png holds the values \[3\], outside the 2"):
        read_all(root)


def test_rgb_masks_equal_channels_accepted_else_refused(tmp_path):
    root = pairs_folder(tmp_path / "p")
    for i in range(20):
        save(root / "masks" / f"c{i:02d}.png", np.repeat(mask_array(i)[..., None], 3, axis=2))
    ds = load_dataset(str(root))
    assert {int(m.max()) for m in ds["train"].labels[:]} == {0, 1}
    colour = np.zeros((12, 16, 3), dtype=np.uint8)
    colour[2:5, 2:5] = (255, 0, 0)
    save(root / "masks" / "c00.png", colour)
    with pytest.raises(DataError, match=r"c00\.png is a colour \(RGB\) mask"):
        load_dataset(str(root))  # c00 is among the masks sampled for the labels


def test_corrupt_image_files(tmp_path):
    root = pairs_folder(tmp_path / "p")
    (root / "images" / "c02.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"c02\.jpg: cannot read this image"):
        load_dataset(str(root))
    root = pairs_folder(tmp_path / "q")
    data = (root / "masks" / "c01.png").read_bytes()
    (root / "masks" / "c01.png").write_bytes(data[: len(data) // 2])  # header intact
    with pytest.raises(DataError, match=r"c01\.png: cannot read this mask"):
        read_all(root)


def test_16_bit_and_float_images_are_scaled_and_recorded(tmp_path):
    root = pairs_folder(tmp_path / "p")
    deep = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)
    save(root / "images" / "c00.png", deep)
    (root / "images" / "c00.jpg").unlink()
    ds = load_dataset(str(root))
    split = next(s for s in ds.splits.values() if any(m["id"] == "c00" for m in s.meta))
    image = split.images[[m["id"] for m in split.meta].index("c00")]
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    assert "16-bit" in ds.provenance["intensity"]


def test_empty_folders(tmp_path):
    (tmp_path / "p" / "images").mkdir(parents=True)
    (tmp_path / "p" / "masks").mkdir()
    with pytest.raises(DataError, match=r"images holds no"):
        load_dataset(str(tmp_path / "p"))
    (tmp_path / "d" / "stage1_train").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no case folders"):
        load_dataset(str(tmp_path / "d"))
    (tmp_path / "m" / "imagesTr").mkdir(parents=True)
    (tmp_path / "m" / "labelsTr").mkdir()
    with pytest.raises(DataError, match=r"imagesTr holds no"):
        load_dataset(str(tmp_path / "m"))


def test_dsb_missing_image_or_masks_folder(tmp_path):
    root = dsb_folder(tmp_path / "d")
    (root / "stage1_train" / "id03" / "images" / "id03.png").unlink()
    with pytest.raises(DataError, match=r"id03 has no image"):
        load_dataset(str(root))
    root = dsb_folder(tmp_path / "e")
    for p in (root / "stage1_train" / "id04" / "masks").iterdir():
        p.unlink()
    (root / "stage1_train" / "id04" / "masks").rmdir()
    with pytest.raises(DataError, match=r"id04\.png has no masks"):
        load_dataset(str(root))


def test_nifti_shape_and_affine_mismatch(tmp_path):
    root = msd_folder(tmp_path / "m")
    nifti(
        root / "labelsTr" / "case_002.nii.gz",
        np.zeros((6, 7, 4), dtype=np.uint8),
        zooms=(0.5, 0.8, 2.0),
    )
    with pytest.raises(DataError, match=r"case_002\.nii\.gz has shape \(6, 7, 4\) but its image"):
        load_dataset(str(root))
    root = msd_folder(tmp_path / "n")
    nifti(root / "labelsTr" / "case_002.nii.gz", np.zeros((6, 7, 5), dtype=np.uint8))
    with pytest.raises(DataError, match="different affines"):
        load_dataset(str(root))


def test_nifti_missing_label_and_corrupt_file(tmp_path):
    root = msd_folder(tmp_path / "m")
    (root / "labelsTr" / "case_004.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case_004\.nii\.gz has no label"):
        load_dataset(str(root))
    root = msd_folder(tmp_path / "n")
    (root / "imagesTr" / "case_001.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"case_001\.nii\.gz: cannot read this NIfTI"):
        load_dataset(str(root))


def test_nifti_label_outside_declared_labels(tmp_path):
    root = msd_folder(tmp_path / "m", labels={"0": "background", "1": "a"})
    ds = load_dataset(str(root))
    bad = next(
        (s, i) for s in ds.splits.values() for i, m in enumerate(s.meta) if int(m["id"][-3:]) % 2
    )
    with pytest.raises(DataError, match=r"holds the values \[2\], outside the 2 declared"):
        bad[0].labels[bad[1]]


def test_bad_dataset_json(tmp_path):
    root = msd_folder(tmp_path / "m")
    (root / "dataset.json").write_text('{"labels": {"1": "a", "2": "b"}}')
    with pytest.raises(DataError, match="must number 0..K"):
        load_dataset(str(root))
