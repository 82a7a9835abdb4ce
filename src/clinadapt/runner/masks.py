"""Predicted label maps written as files people open beside their images: 2D masks as 8-bit PNGs
that clinadapt's image/mask folders read back as the same mask, 3D masks as NIfTI on the input
image's voxel grid. nibabel (extra "volumes") is needed for 3D masks only."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from clinadapt._optional import require
from clinadapt.data.lazy import IMAGE_SUFFIXES
from clinadapt.data.volumes import VOLUME_SUFFIXES
from clinadapt.errors import ConfigError, DataError
from clinadapt.eval.segmentation import check_labels
from clinadapt.runner.records import write_bytes_atomic

SUFFIXES = {2: ".png", 3: ".nii.gz"}  # by the mask's number of dimensions
MAX_CLASSES = 256  # label maps are stored as 8 bits
# Endings that name a file type: a path ending in another one than the file gets is a mistake;
# any other ending is part of the name (case ids such as "patient1.scan2" keep their dots).
_FILE_TYPES = (*IMAGE_SUFFIXES, *VOLUME_SUFFIXES, ".gz", ".npy", ".npz", ".pdf", ".svg", ".json")


def output_path(path: str | Path, suffix: str) -> Path:
    """``path`` ending in ``suffix``: kept when it does (any case), ``suffix`` appended when the
    name has no file-type ending, a ``ConfigError`` when it names another file type."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(suffix):
        return path
    if name.endswith(_FILE_TYPES):
        raise ConfigError(
            f"{path}: this file is written as {suffix}; give a name ending in {suffix} or no "
            "suffix at all"
        )
    return path.with_name(path.name + suffix)


def check_num_classes(num_classes: int) -> int:
    """``num_classes`` (background included) after checking it fits 8-bit label maps."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ConfigError(f"num_classes must be an integer, got {num_classes!r}")
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ConfigError(
            f"num_classes must be 2..{MAX_CLASSES} (background + at least one class, stored as "
            f"8 bits), got {num_classes}"
        )
    return int(num_classes)


def write_mask(
    mask: np.ndarray, path: Path, *, num_classes: int, affine: np.ndarray | None = None
) -> Path:
    """Write one predicted label map (0 = background) and return the path written.

    2D (H, W) masks become 8-bit PNGs: binary masks (``num_classes == 2``) as 0/255, so the
    foreground is visible in any viewer and clinadapt's image/mask reader (Kvasir-style
    ``masks/``) reads them back as the same mask; more classes as the class indices 0..K-1.
    3D (D, H, W) masks become uint8 NIfTI (``.nii.gz``) with the array axes reversed to the
    file's (i, j, k) = (W, H, D), as clinadapt reads MSD labels, and ``affine``, the input
    image's voxel-to-world transform, so the mask lies on its image in any viewer; None writes
    the identity (1 mm voxels at the origin). A 2D mask takes no affine.

    ``path`` may end in the file's suffix or have none (it is added). The file is written
    through a temporary one, so an interruption or a bad mask leaves nothing half-written.
    """
    k = check_num_classes(num_classes)
    a = np.asarray(mask)
    if a.ndim not in SUFFIXES or a.size == 0:
        raise DataError(
            f"cannot write the mask {path}: expected a non-empty 2D (H, W) or 3D (D, H, W) "
            f"label map, got shape {a.shape}"
        )
    path = output_path(path, SUFFIXES[a.ndim])
    labels = check_labels(f"the mask for {path}", a, k).astype(np.uint8)
    if a.ndim == 2:
        if affine is not None:
            raise ConfigError(f"{path}: a 2D mask is written as a PNG, which has no affine")
        data = _png_bytes(labels * 255 if k == 2 else labels)
    else:
        data = _nifti_bytes(labels, _check_affine(affine, path))
    write_bytes_atomic(path, data)
    return path


def _check_affine(affine: np.ndarray | None, path: Path) -> np.ndarray:
    if affine is None:
        return np.eye(4)
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.empty(0)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise DataError(
            f"{path}: the affine must be a finite 4x4 voxel-to-world matrix (the input image's), "
            f"got {affine!r}"
        )
    return a


def _png_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def _nifti_bytes(labels: np.ndarray, affine: np.ndarray) -> bytes:
    nib = require("nibabel", extra="volumes", needed_by="writing 3D masks as NIfTI")
    image = nib.Nifti1Image(labels.transpose(2, 1, 0), affine)  # (D, H, W) -> file (i, j, k)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
