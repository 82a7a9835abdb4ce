"""In-memory (or memory-mapped) view of a dataset: splits of images and labels plus provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from clinadapt.data.info import DatasetInfo

SPLITS = ("train", "val", "test")


class ImageSource(Protocol):
    """Anything indexable that yields images: a numpy array, a memmap, or a lazy file list.

    ``source[i]`` is one image as a numpy array, channel-last: (H, W) grayscale, (H, W, C)
    colour, or (D, H, W) for a volume. ``source[indices]`` with an integer array returns a
    stacked batch when all items share a shape.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> np.ndarray: ...


@dataclass
class Split:
    """Classification: ``labels`` is an int64 array, (N, 1) single-label or (N, C) multi-label.

    Segmentation: ``images`` and ``labels`` are ``CaseSource``s (cases differ in size):
    ``labels[i]`` is the uint8 mask of ``images[i]``, same spatial shape, 0 = background; and
    ``meta[i]`` describes the case: ``id``, ``source`` (image file), ``shape``, ``spacing`` (mm
    per array axis, None when unknown), and per layout ``mask``, ``affine`` or ``instances``.
    """

    images: ImageSource
    labels: Any
    meta: list[dict[str, Any]] | None = None
    domains: np.ndarray | None = None
    """Classification: the source (hospital, scanner, modality) of each example, as strings,
    when the data names one (a manifest's ``domain`` column); None otherwise."""

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    info: DatasetInfo
    splits: dict[str, Split]
    size: int | None = None  # image edge length when uniform, e.g. 28
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where the data came from: ``source`` (path or URL), ``md5``, ``expected_md5``,
    ``verified`` (True / False / None when no official checksum exists)."""

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


class Subset:
    """Some items of an image source, read on access: a support set of a memory-mapped split
    does not load the rest of the split."""

    def __init__(self, source: ImageSource, indices: np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.asarray(self.source[self.indices[index]])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices), *np.asarray(self.source[self.indices[:1]]).shape[1:])
