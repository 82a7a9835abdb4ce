"""The real segmentation datasets in ../shared/data: counts, label values, spacing, laziness."""

from pathlib import Path

import numpy as np
import pytest

from clinadapt.data import load_dataset, seg_files
from clinadapt.data.segmentation import LABEL_SAMPLES

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def root() -> Path:
    if not (SHARED_DATA / "kvasir_seg").is_dir():
        pytest.skip(f"real segmentation data not found in {SHARED_DATA} (../shared/data absent)")
    return SHARED_DATA


def counts(ds) -> int:
    return sum(len(split) for split in ds.splits.values())


def test_kvasir_opens_lazily(root, monkeypatch):
    decoded = []
    decode = seg_files.decode_mask
    monkeypatch.setattr(seg_files, "decode_mask", lambda p: decoded.append(p) or decode(p))
    ds = load_dataset("kvasir_seg", root=root)
    assert counts(ds) == 1000 and ds.info.splits == {"train": 700, "val": 100, "test": 200}
    assert len(decoded) <= LABEL_SAMPLES  # only the masks sampled for the encoding
    image, mask = ds["test"].images[0], ds["test"].labels[0]
    assert image.ndim == 3 and image.shape[:2] == mask.shape and set(np.unique(mask)) == {0, 1}
    assert ds.info.labels == ("background", "polyp")


def test_dsb2018_counts_and_union(root):
    ds = load_dataset("dsb2018_nuclei", root=root)
    assert counts(ds) == 200
    split = ds["val"]
    mask, meta = split.labels[0], split.meta[0]
    instances = seg_files.read_instances(meta["instances"], meta["shape"])
    assert ((instances > 0) == (mask == 1)).all() and instances.max() == len(meta["instances"])


def test_hippocampus_counts_labels_and_spacing(root):
    ds = load_dataset("hippocampus_msd", root=root / "medmnist")  # found beside the MedMNIST folder
    assert counts(ds) == 260 and ds.info.num_classes == 3 and ds.info.ndim == 3
    split = ds["test"]
    for i in range(3):
        image, label, meta = split.images[i], split.labels[i], split.meta[i]
        assert image.shape == label.shape == meta["shape"] and image.dtype == np.float32
        assert set(np.unique(label)) == {0, 1, 2} and meta["spacing"] == (1.0, 1.0, 1.0)
        assert np.asarray(meta["affine"]).shape == (4, 4)
