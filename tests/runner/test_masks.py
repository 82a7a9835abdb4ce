import sys

import numpy as np
import pytest
from PIL import Image

from clinadapt.data import seg_files as sf
from clinadapt.data.segmentation import load_segmentation
from clinadapt.errors import ClinadaptError, ConfigError, DataError
from clinadapt.runner.masks import write_mask


def rotation_affine() -> np.ndarray:
    """A voxel-to-world transform with anisotropic voxels, a rotation, a flip and an offset."""
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [-90.5, 12.25, 40.0]
    return affine


def test_binary_2d_mask_is_visible_and_read_back_by_the_image_mask_reader(tmp_path):
    rng = np.random.default_rng(0)
    masks = {}
    (tmp_path / "images").mkdir()
    for i in range(10):
        name = f"case{i}"
        mask = (rng.random((17, 23)) > 0.6).astype(np.int64)
        image = rng.integers(0, 255, (17, 23, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / f"{name}.png")
        path = write_mask(mask, tmp_path / "masks" / name, num_classes=2)
        assert path == tmp_path / "masks" / f"{name}.png"
        assert set(np.unique(sf.decode_mask(path))) == {0, 255}  # visible in any viewer
        masks[name] = mask
    dataset = load_segmentation(tmp_path)
    assert dataset.info.labels == ("background", "foreground")
    read = 0
    for split in dataset.splits.values():
        for i, meta in enumerate(split.meta):
            np.testing.assert_array_equal(split.labels[i], masks[meta["id"]])
            read += 1
    assert read == len(masks)


def test_multiclass_2d_mask_holds_class_indices(tmp_path):
    mask = np.random.default_rng(1).integers(0, 4, (9, 14)).astype(np.int32)
    path = write_mask(mask, tmp_path / "m.png", num_classes=4)
    assert path == tmp_path / "m.png"
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (14, 9)
    np.testing.assert_array_equal(sf.read_mask(path, (9, 14), "index", 4), mask)


def test_3d_mask_keeps_the_affine_and_reads_back_as_the_msd_reader_does(tmp_path):
    nib = pytest.importorskip("nibabel")
    mask = np.random.default_rng(2).integers(0, 3, (5, 7, 9)).astype(np.int64)  # (D, H, W)
    affine = rotation_affine()
    path = write_mask(mask, tmp_path / "la_003", num_classes=3, affine=affine)
    assert path == tmp_path / "la_003.nii.gz"
    stored = nib.load(str(path))
    np.testing.assert_allclose(stored.affine, affine, atol=1e-6)
    assert stored.shape == (9, 7, 5) and stored.get_data_dtype() == np.uint8  # file (i, j, k)
    np.testing.assert_array_equal(sf.read_nifti_label(path, 3), mask)
    # the mask lies on the grid of an image with the same affine, as MSD pairs must
    image = tmp_path / "la_003_image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((9, 7, 5), np.float32), affine), str(image))
    assert sf.check_nifti_pair(image, path)["shape"] == (9, 7, 5)


def test_3d_mask_without_affine_gets_the_identity(tmp_path):
    nib = pytest.importorskip("nibabel")
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    path = write_mask(mask, tmp_path / "v.nii.gz", num_classes=2)
    np.testing.assert_array_equal(nib.load(str(path)).affine, np.eye(4))
    np.testing.assert_array_equal(sf.read_nifti_label(path, 2), mask)


def test_suffixes_are_added_kept_or_refused(tmp_path):
    mask = np.zeros((4, 4), dtype=np.uint8)
    assert write_mask(mask, tmp_path / "patient1.scan2", num_classes=2).name == (
        "patient1.scan2.png"
    )
    assert write_mask(mask, tmp_path / "upper.PNG", num_classes=2).name == "upper.PNG"
    written = set(tmp_path.iterdir())
    for name, shape in (("a.nii.gz", (4, 4)), ("a.jpg", (4, 4)), ("a.png", (2, 4, 4))):
        with pytest.raises(ConfigError, match=r"written as \.(png|nii\.gz)"):
            write_mask(np.zeros(shape, np.uint8), tmp_path / name, num_classes=2)
    with pytest.raises(ConfigError, match="nii.gz"):
        write_mask(np.zeros((2, 4, 4), np.uint8), tmp_path / "a.nii", num_classes=2)
    assert set(tmp_path.iterdir()) == written


@pytest.mark.parametrize(
    ("mask", "kwargs", "error", "match"),
    [
        (np.full((4, 4), 0.5), {}, DataError, "non-integer label 0.5"),
        (np.full((4, 4), np.nan), {}, DataError, "NaN"),
        (np.full((4, 4), 2), {}, DataError, r"label 2 outside \[0, 2\)"),
        (np.full((4, 4), -1), {}, DataError, "label -1 outside"),
        (np.array([["a", "b"]]), {}, DataError, "integer label map, got dtype <U1"),
        (np.zeros(4), {}, DataError, r"got shape \(4,\)"),
        (np.zeros((2, 3, 4, 5)), {}, DataError, r"got shape \(2, 3, 4, 5\)"),
        (np.zeros((0, 4)), {}, DataError, "non-empty"),
        (np.zeros((4, 4)), {"num_classes": 1}, ConfigError, "num_classes must be 2..256"),
        (np.zeros((4, 4)), {"num_classes": 300}, ConfigError, "num_classes must be 2..256"),
        (np.zeros((4, 4)), {"num_classes": True}, ConfigError, "must be an integer"),
        (np.zeros((4, 4)), {"affine": np.eye(4)}, ConfigError, "no affine"),
        (np.zeros((2, 4, 4)), {"affine": np.eye(3)}, DataError, "finite 4x4"),
        (np.zeros((2, 4, 4)), {"affine": np.full((4, 4), np.inf)}, DataError, "finite 4x4"),
    ],
)
def test_bad_masks_raise_and_leave_no_file(tmp_path, mask, kwargs, error, match):
    pytest.importorskip("nibabel")
    kwargs = {"num_classes": 2, **kwargs}
    with pytest.raises(error, match=match):
        write_mask(mask, tmp_path / "m", **kwargs)
    assert not list(tmp_path.iterdir())


def test_float_masks_of_whole_numbers_are_accepted(tmp_path):
    mask = np.array([[0.0, 1.0], [2.0, 0.0]])
    path = write_mask(mask, tmp_path / "m", num_classes=3)
    np.testing.assert_array_equal(sf.decode_mask(path), mask)


def test_a_failed_write_keeps_the_previous_mask(tmp_path):
    path = write_mask(np.eye(4, dtype=np.uint8), tmp_path / "m", num_classes=2)
    before = path.read_bytes()
    with pytest.raises(DataError):
        write_mask(np.full((4, 4), 7), path, num_classes=2)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_3d_masks_without_nibabel_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ClinadaptError, match=r"clinadapt\[volumes\]"):
        write_mask(np.zeros((2, 3, 4), np.uint8), tmp_path / "v", num_classes=2)
    assert not list(tmp_path.iterdir())
    assert write_mask(np.zeros((3, 4), np.uint8), tmp_path / "p", num_classes=2).is_file()
