"""3D volumes (NIfTI files, DICOM series or multi-frame DICOM files) read as a fixed cube.

Volumes differ in size and intensity units (CT in HU, MRI arbitrary), so each one is resampled
to ``size``^3 and its intensities clipped to the 0.5-99.5 percentiles and scaled to [0, 1].
nibabel and pydicom are optional: they are imported here, only when a volume is read.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clinadapt._optional import require
from clinadapt.errors import DataError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm")
PERCENTILES = (0.5, 99.5)
INTENSITY = (
    f"each volume clipped to its {PERCENTILES[0]:g}-{PERCENTILES[1]:g} percentiles and scaled to "
    "[0, 1]"
)


def is_volume(path: Path) -> bool:
    """NIfTI and DICOM files, and folders (a DICOM series), are volumes."""
    return path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES)


def _optional(module: str) -> ModuleType:
    return require(module, extra="volumes", needed_by="reading NIfTI/DICOM volumes")


def read_volume(path: Path, *, size: int = 64) -> np.ndarray:
    """One volume as float32 (size, size, size) = (D, H, W) in [0, 1]."""
    if path.is_dir():
        volume = _read_dicom_series(path)
    elif path.name.lower().endswith(".dcm"):
        volume = _read_dicom_file(path)
    else:
        volume = _read_nifti(path)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise DataError(f"{path}: expected a 3D volume, got an array of shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise DataError(f"{path}: the volume holds NaN or infinite values")
    return scale_intensity(resample(volume, size))


def resample(volume: np.ndarray, size: int) -> np.ndarray:
    """Average-pool the axes that shrink (no aliasing), then trilinear to the cube."""
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    pooled = tuple(min(s, size) for s in volume.shape)
    if pooled != volume.shape:
        t = F.adaptive_avg_pool3d(t, pooled)
    if pooled != (size, size, size):
        t = F.interpolate(t, size=(size, size, size), mode="trilinear", align_corners=False)
    return t[0, 0].numpy()


def scale_intensity(volume: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentiles and scale to [0, 1]; a constant volume becomes zeros."""
    lo, hi = np.percentile(volume, PERCENTILES)
    if hi <= lo:
        return np.zeros_like(volume, dtype=np.float32)
    return ((np.clip(volume, lo, hi) - lo) / (hi - lo)).astype(np.float32)


@contextlib.contextmanager
def _silenced(logger: logging.Logger) -> Iterator[None]:
    """nibabel logs each header problem to stderr besides raising; the DataError says enough."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


@contextlib.contextmanager
def nifti_errors(path: Path) -> Iterator[ModuleType]:
    """nibabel, with any sign of a damaged file turned into a DataError naming ``path``."""
    nib = _optional("nibabel")
    # a damaged header shows up as many kinds of error: an unknown datatype code
    # (HeaderDataError), a non-numeric one (TypeError), a negative size (OverflowError)
    unreadable = (
        OSError,
        EOFError,
        ValueError,
        TypeError,
        OverflowError,
        MemoryError,
        zlib.error,
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
    )
    try:
        with _silenced(nib.imageglobals.logger):
            yield nib
    except unreadable as err:
        raise DataError(
            f"{path}: cannot read this NIfTI file ({err}); its header or data is damaged: "
            "export it again or remove it"
        ) from None


def _read_nifti(path: Path) -> np.ndarray:
    with nifti_errors(path) as nib:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(image.dataobj, dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    # RAS+ (x, y, z) -> (D, H, W) with D along the superior axis: axial slices, like DICOM.
    return data.transpose(2, 1, 0) if data.ndim == 3 else data


def _read_dicom_file(path: Path) -> np.ndarray:
    pydicom = _optional("pydicom")
    unreadable = (OSError, EOFError, ValueError, AttributeError, RuntimeError)
    try:
        ds = pydicom.dcmread(path)
        frames = _pixels(ds)
    except (*unreadable, pydicom.errors.InvalidDicomError) as err:
        raise DataError(f"{path}: cannot read this DICOM file ({err})") from None
    if frames.ndim == 2:
        raise DataError(
            f"{path} is a single 2D DICOM slice; list the folder of its series in the manifest"
        )
    return frames


def _read_dicom_series(folder: Path) -> np.ndarray:
    """Slices of one series sorted along the slice normal (else by InstanceNumber)."""
    pydicom = _optional("pydicom")
    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            slices.append((file, pydicom.dcmread(file)))
        except pydicom.errors.InvalidDicomError:
            continue  # DICOMDIR companions, notes and the like
        except (OSError, EOFError, ValueError) as err:
            raise DataError(f"{file}: cannot read this DICOM file ({err})") from None
    if not slices:
        raise DataError(f"{folder} holds no DICOM files")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise DataError(f"{folder} mixes {len(series)} DICOM series; keep one series per folder")
    slices.sort(key=lambda item: _slice_position(item[1]))
    arrays = []
    for file, ds in slices:
        try:
            arrays.append(_pixels(ds))
        except (ValueError, AttributeError, RuntimeError) as err:  # e.g. a missing JPEG decoder
            raise DataError(f"{file}: cannot decode its pixel data ({err})") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1 or arrays[0].ndim != 2:
        raise DataError(f"{folder}: slices have differing or non-2D shapes {sorted(shapes)}")
    return np.stack(arrays)


def _slice_position(ds: Any) -> float:
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is not None and orientation is not None:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return float(np.dot(normal, np.asarray(position, float)))
    return float(ds.get("InstanceNumber", 0) or 0)


def _pixels(ds: Any) -> np.ndarray:
    """Pixel data in scanner units (RescaleSlope/Intercept applied, e.g. CT in HU)."""
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("colour DICOM is not supported for volumes")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float32) * slope + intercept
