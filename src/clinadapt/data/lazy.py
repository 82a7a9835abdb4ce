"""Images and volumes read from files on access, so a folder larger than memory costs only the
batch being read. Every item is brought to one shape on read, so batches stack."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clinadapt.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
INTENSITY = "8-bit images as stored; 16-bit and float images min-max scaled to 8 bits per image"


class LazySource:
    """An ``ImageSource`` over files: ``source[i]`` reads one item, ``source[indices]`` a
    stacked batch. ``shape``, ``ndim`` and ``dtype`` describe it like the array it stands for."""

    def __init__(
        self,
        paths: Sequence[Path],
        loader: Callable[[Path], np.ndarray],
        item_shape: tuple[int, ...],
        dtype: np.dtype | type,
    ) -> None:
        self.paths = list(paths)
        self.loader = loader
        self.item_shape = tuple(item_shape)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), *self.item_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.item_shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return self.loader(self.paths[index])
        rows = np.arange(len(self.paths))[index]
        if len(rows) == 0:
            return np.empty((0, *self.item_shape), dtype=self.dtype)
        return np.stack([self.loader(self.paths[i]) for i in rows])

    def __repr__(self) -> str:
        return f"LazySource({len(self)} files, item_shape={self.item_shape}, dtype={self.dtype})"


class CaseSource:
    """An ``ImageSource`` over cases whose arrays differ in shape (segmentation images and
    masks at their own size): ``source[i]`` reads one case, ``source[indices]`` (an integer
    array, list or slice) a list of arrays, never stacked."""

    def __init__(self, paths: Sequence[Path], loader: Callable[[int], np.ndarray]) -> None:
        self.paths = list(paths)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int | np.integer):
            return self.loader(int(np.arange(len(self.paths))[index]))
        return [self.loader(int(i)) for i in np.arange(len(self.paths))[index]]

    def __repr__(self) -> str:
        return f"CaseSource({len(self)} cases)"


READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable(path: Path, err: BaseException) -> DataError:
    return DataError(f"{path}: cannot read this image ({err}); replace or remove it")


def infer_channels(paths: Sequence[Path], samples: int = 16) -> int:
    """3 when any of a spread of sample images is colour, else 1 (headers only, no decoding)."""
    for path in list(paths)[:: max(1, len(paths) // samples)][:samples]:
        try:
            with Image.open(path) as im:
                if im.mode not in GRAY_MODES:
                    return 3
        except READ_ERRORS as err:
            raise _unreadable(path, err) from None
    return 1


def load_image(path: Path, *, size: int, channels: int) -> np.ndarray:
    """One image as uint8 (size, size) or (size, size, 3), resized with PIL bilinear."""
    out = Image.fromarray(decode_image(path, channels=channels))
    if out.size != (size, size):
        out = out.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(out, dtype=np.uint8)


def decode_image(path: Path, *, channels: int) -> np.ndarray:
    """One image at its own size as uint8 (H, W) or (H, W, 3).

    16-bit and float images (common for X-ray PNG/TIFF) are min-max scaled to 8 bits per image,
    because PIL's own conversion would clip them.
    """
    try:
        with Image.open(path) as im:
            im.load()
            deep = im.mode in HIGH_DEPTH_MODES
            a = np.asarray(im, dtype=np.float32) if deep else None
            out = None if deep else im.convert("RGB" if channels == 3 else "L")
    except READ_ERRORS as err:
        raise _unreadable(path, err) from None
    if a is not None:
        if not np.isfinite(a).all():
            raise DataError(f"{path}: the image holds NaN or infinite values; fix or remove it")
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        out = Image.fromarray(np.round(a * 255).astype(np.uint8))
    if channels == 3:
        out = out.convert("RGB")
    return np.array(out, dtype=np.uint8)
