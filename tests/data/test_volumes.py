import struct
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from clinadapt.data import load_dataset
from clinadapt.data.volumes import read_volume, resample, scale_intensity
from clinadapt.errors import ClinadaptError, DataError


def write_nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    return path


def ramp(shape=(10, 12, 8), axis=2) -> np.ndarray:
    """Values rising along ``axis`` (x, y, z order as stored in NIfTI)."""
    r = np.arange(shape[axis], dtype=np.float32)
    return np.broadcast_to(r.reshape([-1 if a == axis else 1 for a in range(3)]), shape).copy()


def dicom_slice(pixels: np.ndarray, z: float, series: str, number: int, frames: int = 1):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.InstanceNumber = series, number
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_series(folder: Path, depth: int = 6, series: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    for k in range(depth):  # names and instance numbers run against the anatomical order
        pixels = np.full((8, 8), 1000 + 10 * k)
        dicom_slice(pixels, z=2.5 * k, series=series, number=depth - k).save_as(
            folder / f"{depth - k:03d}.dcm", enforce_file_format=True
        )
    return folder


def test_nifti_becomes_a_unit_cube_with_depth_along_superior(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", ramp(axis=2))
    volume = read_volume(path, size=16)
    assert volume.shape == (16, 16, 16) and volume.dtype == np.float32
    assert volume.min() == 0 and volume.max() == 1
    assert np.all(np.diff(volume.mean(axis=(1, 2))) > 0)  # z ramp runs along D
    assert np.allclose(volume.std(axis=(1, 2)), 0, atol=1e-6)  # constant within each slice


def test_trailing_singleton_axis_and_4d(tmp_path):
    path = write_nifti(tmp_path / "v.nii", ramp()[..., None])
    assert read_volume(path, size=8).shape == (8, 8, 8)
    bad = write_nifti(tmp_path / "t.nii", np.zeros((4, 4, 4, 3)))
    with pytest.raises(DataError, match="t.nii: expected a 3D volume"):
        read_volume(bad)


def test_intensity_scaling_ignores_outliers():
    volume = np.random.default_rng(0).normal(100, 10, (20, 20, 20)).astype(np.float32)
    volume[0, 0, 0] = 1e6
    scaled = scale_intensity(volume)
    assert scaled.min() == 0 and scaled.max() == 1
    assert 0.3 < np.median(scaled) < 0.7  # one hot voxel does not squash the rest
    assert not scale_intensity(np.ones((4, 4, 4))).any()


def test_resample_shrinks_by_averaging_and_grows():
    checker = (np.indices((32, 32, 32)).sum(axis=0) % 2).astype(np.float32)
    np.testing.assert_allclose(resample(checker, 8), 0.5, atol=1e-6)
    assert resample(np.zeros((3, 40, 40)), 16).shape == (16, 16, 16)


def test_dicom_series_is_sorted_by_position_and_rescaled(tmp_path):
    folder = write_series(tmp_path / "series")
    (folder / "README.txt").write_text("not dicom")
    raw = np.stack([pydicom.dcmread(folder / f"{6 - k:03d}.dcm").pixel_array for k in range(6)])
    assert raw[:, 0, 0].tolist() == [1000 + 10 * k for k in range(6)]
    volume = read_volume(folder, size=6)
    assert np.all(np.diff(volume.mean(axis=(1, 2))) > 0)


def test_multiframe_dicom_file_and_single_slice(tmp_path):
    frames = np.stack([np.full((8, 8), 100 * k) for k in range(4)])
    dicom_slice(frames, 0, generate_uid(), 1, frames=4).save_as(
        tmp_path / "multi.dcm", enforce_file_format=True
    )
    volume = read_volume(tmp_path / "multi.dcm", size=8)
    assert volume.shape == (8, 8, 8) and volume[0].max() == 0 and volume[-1].min() == 1
    dicom_slice(np.zeros((8, 8)), 0, generate_uid(), 1).save_as(
        tmp_path / "one.dcm", enforce_file_format=True
    )
    with pytest.raises(DataError, match="single 2D DICOM slice"):
        read_volume(tmp_path / "one.dcm")


def test_broken_inputs_are_named(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", ramp())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="v.nii.gz"):
        read_volume(path)
    nan = write_nifti(tmp_path / "nan.nii", np.full((4, 4, 4), np.nan))
    with pytest.raises(DataError, match="NaN"):
        read_volume(nan)
    write_series(tmp_path / "mixed", depth=2)
    write_series(tmp_path / "other", depth=2)
    (tmp_path / "other" / "001.dcm").rename(tmp_path / "mixed" / "zzz.dcm")
    with pytest.raises(DataError, match="mixes 2 DICOM series"):
        read_volume(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM files"):
        read_volume(tmp_path / "empty")


@pytest.mark.parametrize(
    ("offset", "value"),
    [(70, 999), (70, 0), (70, 128), (42, -3)],
    ids=["unknown-datatype", "datatype-0", "rgb-datatype", "negative-dim"],
)
def test_invalid_nifti_header_is_named(tmp_path, caplog, offset, value):
    path = write_nifti(tmp_path / "v.nii", ramp())
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 2] = struct.pack("<h", value)  # NIfTI-1 header fields are int16
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"v\.nii: cannot read this NIfTI file"):
        read_volume(path)
    assert not caplog.records  # the error alone, without nibabel's log lines on stderr


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "v.nii.gz", ramp())
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ClinadaptError, match=r"pip install 'clinadapt\[volumes\]'"):
        read_volume(path)


def test_manifest_of_volumes(tmp_path):
    rows = []
    for i in range(10):
        write_nifti(tmp_path / f"{i}.nii.gz", ramp() * (i + 1))
        rows.append(f"{i}.nii.gz,{'ab'[i % 2]},{'train' if i < 6 else 'test'}")
    write_series(tmp_path / "dicom")
    rows.append("dicom,a,val")
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    ds = load_dataset(str(tmp_path / "m.csv"), volume_size=12)
    assert ds.info.ndim == 3 and ds.info.channels == 1 and ds.size == 12
    assert "0.5-99.5 percentiles" in ds.provenance["intensity"]
    assert ds["train"].images[:].shape == (6, 12, 12, 12)
    assert ds["val"].images[0].shape == (12, 12, 12)
