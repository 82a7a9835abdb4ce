"""Reading one segmentation case: a 2D mask (or a DSB2018 set of instance masks) beside its
image, or an MSD NIfTI image/label pair. Headers are checked when a dataset is opened; pixels
are checked when a case is read, and every error names the file and what to do."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clinadapt.data.lazy import READ_ERRORS
from clinadapt.data.volumes import nifti_errors, scale_intensity
from clinadapt.errors import DataError

THRESHOLD = 128  # 0/255 masks (JPEG noise included): foreground where the value is >= 128
MASK_ENCODINGS = {
    "threshold": f"0/255 masks, foreground where the value is >= {THRESHOLD} (JPEG noise)",
    "index": "mask values are class indices",
}
AFFINE_TOLERANCE = 1e-3  # mm: image and label affines must agree to this


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the header only."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read this image ({err}); replace or remove it") from None


def check_same_size(image: Path, mask: Path) -> tuple[int, int]:
    """The image's (height, width), after checking its mask has the same."""
    (h, w), (mh, mw) = image_size(image), image_size(mask)
    if (h, w) != (mh, mw):
        raise DataError(
            f"{mask} is {mh}x{mw} but its image {image} is {h}x{w} (height x width); "
            "a mask must have the size of its image: re-export one of them"
        )
    return h, w


def decode_mask(path: Path) -> np.ndarray:
    """The stored values of a 2D mask as an integer (H, W) array. Palette masks give their
    indices; RGB masks are accepted when all colour channels are equal (grayscale saved as RGB)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            a = np.asarray(im)
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read this mask ({err}); replace or remove it") from None
    if mode == "F" or a.dtype.kind == "f":
        raise DataError(f"{path}: the mask holds float values; save masks as integer PNGs")
    if a.ndim == 3:
        colour = a[..., :3]
        if not (colour == colour[..., :1]).all():
            raise DataError(
                f"{path} is a colour (RGB) mask with differing channels; save masks as "
                "single-channel images of class indices (0 = background)"
            )
        a = colour[..., 0]
    return a.astype(np.int64)


def encode_mask(values: np.ndarray, encoding: str, num_classes: int, path: Path) -> np.ndarray:
    """Stored mask values -> uint8 class indices, refusing values outside the declared labels."""
    if encoding == "threshold":
        return (values >= THRESHOLD).astype(np.uint8)
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        found = sorted(int(v) for v in np.unique(values[bad]))[:10]
        raise DataError(
            f"{path} holds the values {found}, outside the {num_classes} declared labels "
            f"0..{num_classes - 1}; fix the mask, or declare the labels in a dataset.json "
            'beside images/ (MSD format: "labels": {"0": "background", ...})'
        )
    return values.astype(np.uint8)


def read_mask(path: Path, shape: tuple[int, int], encoding: str, num_classes: int) -> np.ndarray:
    values = decode_mask(path)
    if values.shape != shape:
        raise DataError(
            f"{path} is {values.shape[0]}x{values.shape[1]} but its image is {shape[0]}x"
            f"{shape[1]}; a mask must have the size of its image"
        )
    return encode_mask(values, encoding, num_classes, path)


def read_instances(paths: Sequence[Path | str], shape: tuple[int, int]) -> np.ndarray:
    """DSB2018 instance masks (one PNG per nucleus, foreground = nonzero) as an int32 (H, W)
    map: 0 background, i + 1 for ``paths[i]``; where instances overlap the later file wins."""
    out = np.zeros(shape, dtype=np.int32)
    for i, path in enumerate(paths):
        values = decode_mask(Path(path))
        if values.shape != shape:
            raise DataError(
                f"{path} is {values.shape[0]}x{values.shape[1]} but its image is {shape[0]}x"
                f"{shape[1]}; every instance mask must have the size of its image"
            )
        out[values > 0] = i + 1
    return out


def nifti_header(path: Path) -> dict[str, Any]:
    """Shape (file axes), affine and voxel size of a NIfTI file, from its header only."""
    with nifti_errors(path) as nib:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
        # float32 in the header: its shortest repr (0.8, not 0.800000011920929)
        zooms = tuple(float(str(np.float32(z))) for z in image.header.get_zooms()[:3])
        affine = np.asarray(image.affine, dtype=np.float64)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(
            f"{path} has shape {shape}; expected one 3D volume (multi-channel volumes are not "
            "supported: keep one modality per file)"
        )
    return {"shape": shape, "affine": affine, "zooms": zooms}


def check_nifti_pair(image: Path, label: Path) -> dict[str, Any]:
    """The image's header, after checking the label lies on the same voxel grid."""
    a, b = nifti_header(image), nifti_header(label)
    if a["shape"] != b["shape"]:
        raise DataError(
            f"{label} has shape {b['shape']} but its image {image} has {a['shape']}; "
            "the label must be on the image's voxel grid: resample it to the image"
        )
    if not np.allclose(a["affine"], b["affine"], atol=AFFINE_TOLERANCE):
        raise DataError(
            f"{label} and its image {image} have different affines (voxel-to-world "
            f"transforms):\n{b['affine'].round(4)}\nversus\n{a['affine'].round(4)}\nresample "
            "the label onto the image, or fix the header that is wrong"
        )
    return a


def _nifti_array(path: Path) -> np.ndarray:
    """The stored voxels with the axes reversed: file (i, j, k) -> array (D, H, W) = (k, j, i),
    so ``array.transpose(2, 1, 0)`` with the file's affine writes it back in place."""
    with nifti_errors(path) as nib:
        data = np.asarray(nib.load(str(path)).dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data.transpose(2, 1, 0)


def read_nifti_image(path: Path) -> np.ndarray:
    """float32 (D, H, W) in [0, 1], intensities scaled like every volume (``volumes.INTENSITY``)."""
    data = _nifti_array(path).astype(np.float32)
    if not np.isfinite(data).all():
        raise DataError(f"{path}: the volume holds NaN or infinite values; fix or remove it")
    return scale_intensity(data)


def read_nifti_label(path: Path, num_classes: int) -> np.ndarray:
    data = _nifti_array(path)
    if data.dtype.kind == "f" and (not np.isfinite(data).all() or (data != np.round(data)).any()):
        raise DataError(f"{path}: label values must be whole numbers (class indices)")
    return encode_mask(data.astype(np.int64), "index", num_classes, path)


def read_label_names(path: Path) -> tuple[str, ...] | None:
    """Class names from an MSD ``dataset.json`` (``{"0": "background", ...}``, or nnU-Net v2's
    ``{"background": 0, ...}``); None when the file is absent."""
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
        pairs = [
            (int(k), str(v)) if str(k).isdigit() else (int(v), str(k)) for k, v in labels.items()
        ]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(
            f'{path}: cannot read its "labels" ({err!r}); expected e.g. '
            '{"labels": {"0": "background", "1": "tumour"}}'
        ) from None
    indices = sorted(i for i, _ in pairs)
    if indices != list(range(len(pairs))) or len(pairs) < 2:
        raise DataError(
            f"{path}: the labels must number 0..K (0 = background, at least one class), "
            f"got {indices}"
        )
    return tuple(name for _, name in sorted(pairs))
