"""MedMNIST ``.npz`` reader: checksum-verified, memory-mapped, validated against its record.

An npz is a zip, so ``np.load(mmap_mode=...)`` cannot map it. Each array is extracted once into
a cache folder of ``.npy`` files keyed by the npz's md5 (a changed file re-extracts) and mapped
from there: memory grows with the batch read, not with the dataset.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from clinadapt.data import files
from clinadapt.data.checks import check_labels, check_pixels
from clinadapt.data.dataset import SPLITS, Dataset, Split
from clinadapt.data.info import DatasetInfo
from clinadapt.errors import ChecksumWarning, ConfigError, DataError
from clinadapt.paths import cache_home

KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
SIBLING_CACHE = ".clinadapt-arrays"
REDOWNLOAD = "Delete it and load again to download the official file."


def npz_name(name: str, size: int) -> str:
    """MedMNIST's file naming: ``breastmnist.npz`` at 28 px, ``breastmnist_64.npz`` otherwise."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def load_medmnist(
    info: DatasetInfo, root: Path, size: int = 28, *, download: bool = True
) -> Dataset:
    """Read (downloading when missing and allowed) the MedMNIST file of ``info`` at ``size``."""
    if size not in info.sizes:
        raise ConfigError(
            f"{info.name} is not released at size {size}; choose one of {list(info.sizes)}"
        )
    path = root / npz_name(info.name, size)
    hint = (
        f"To use a copy you already have, put {path.name} in {root} or point to its folder "
        "with root=... (CLI: --data-root) or the CLINADAPT_DATA environment variable."
    )
    if not path.is_file():
        if not download or size not in info.urls:
            raise DataError(f"{path} does not exist and downloading is off. {hint}")
        files.download(info.urls[size], path, info.md5.get(size), hint=hint)
    md5 = files.md5_file(path)
    expected = info.md5.get(size)
    verified = None if expected is None else md5 == expected
    if verified is False:
        warnings.warn(
            f"{path}: md5 {md5} differs from the official {info.name} release ({expected}); "
            "results may not be comparable with published numbers (recorded as verified=False)",
            ChecksumWarning,
            stacklevel=3,
        )
    arrays = open_arrays(path, md5)
    splits = {s: _split(info, size, path, s, arrays) for s in SPLITS}
    provenance = {
        "source": str(path),
        "md5": md5,
        "expected_md5": expected,
        "verified": verified,
        "size": size,
    }
    return Dataset(info=info, splits=splits, size=size, provenance=provenance)


def _arrays_dir(npz: Path, md5: str) -> Path:
    """Next to the npz when that folder is writable (or already holds them), else the user cache."""
    sibling = npz.parent / SIBLING_CACHE / md5
    if sibling.is_dir() or files.is_writable_dir(npz.parent):
        return sibling
    return cache_home() / "arrays" / md5


def open_arrays(npz: Path, md5: str, *, remedy: str = REDOWNLOAD) -> dict[str, np.ndarray]:
    """The six arrays of an npz in MedMNIST's layout (``KEYS``), memory-mapped from their
    extracted copies; ``remedy`` tells the user what to do with a damaged file."""
    folder = _arrays_dir(npz, md5)
    if folder.is_dir() and not all((folder / f"{k}.npy").is_file() for k in KEYS):
        shutil.rmtree(folder, ignore_errors=True)  # the cache was tampered with: extract again
    if not folder.is_dir():
        _extract(npz, folder, remedy)
    try:
        return {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in KEYS}
    except ValueError as err:
        raise DataError(f"{npz}: an array cannot be read ({err}); the file is corrupt") from None


def _extract(npz: Path, target: Path, remedy: str) -> None:
    """Copy each ``.npy`` member out of the zip into ``target``, which appears all at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a shared data folder's cache should not be
    try:
        with zipfile.ZipFile(npz) as zf:
            members = set(zf.namelist())
            missing = [k for k in KEYS if f"{k}.npy" not in members]
            if missing:
                raise DataError(
                    f"{npz} lacks the arrays {missing}; a MedMNIST file holds {list(KEYS)}. "
                    f"{remedy}"
                )
            for key in KEYS:
                with zf.open(f"{key}.npy") as src, (tmp / f"{key}.npy").open("wb") as dst:
                    shutil.copyfileobj(src, dst, files.CHUNK)
                _to_native_order(tmp / f"{key}.npy")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process extracted it first
                raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(
            f"{npz} is not a readable npz file ({err}): it is truncated or corrupt. {remedy}"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _to_native_order(npy: Path) -> None:
    """Rewrite a big-endian array (saved on another machine) in this machine's byte order, a
    chunk at a time: torch cannot take non-native arrays, and mapping must stay possible."""
    try:
        source = np.load(npy, mmap_mode="r")
    except ValueError:
        return  # not a plain array (e.g. objects): reported when the arrays are opened
    if source.dtype.isnative:
        return
    native = npy.with_suffix(".native")
    target = np.lib.format.open_memmap(
        native, mode="w+", dtype=source.dtype.newbyteorder("="), shape=source.shape
    )
    if source.ndim == 0 or len(source) == 0:
        target[...] = source
    else:
        step = max(1, files.CHUNK * 64 // max(1, source[0].nbytes))
        for start in range(0, len(source), step):
            target[start : start + step] = source[start : start + step]
    target.flush()
    del source, target
    os.replace(native, npy)


def _expected_shape(info: DatasetInfo, size: int) -> tuple[tuple[int, ...], str]:
    if info.ndim == 3:
        return (size, size, size), "(N, D, H, W) volumes"
    if info.channels == 1:
        return (size, size), "(N, H, W) grayscale images"
    return (size, size, info.channels), f"(N, H, W, {info.channels}) colour images"


def _split(info: DatasetInfo, size: int, npz: Path, split: str, arrays: dict) -> Split:
    images, raw_labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    shape, what = _expected_shape(info, size)
    if images.shape[1:] != shape:
        raise DataError(
            f"{npz}: {split}_images has shape {images.shape}; {info.name} at size {size} "
            f"should hold {what} of shape (N, {', '.join(map(str, shape))})"
        )
    check_pixels(images, f"{npz}: {split}_images")
    labels = check_labels(raw_labels, info.task, info.num_classes, f"{npz}: {split}_labels")
    if len(labels) != len(images):
        raise DataError(
            f"{npz}: {split}_images holds {len(images)} images but {split}_labels holds "
            f"{len(labels)} labels"
        )
    return Split(images=images, labels=labels)
