"""Derived image arrays on disk (shifted test sets), keyed by everything that makes them, checked
on every read, so a second run reads what the first computed and a damaged entry is rebuilt.

An entry is ``<key>.npy`` plus ``<key>.json`` (array sha256, shape, dtype, key parts), each
written to a temporary file and renamed into place, the sidecar last: a crash never leaves an
entry that looks complete. Entries are memory-mapped, so a large set costs the batch read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.paths import share_like_new_file

log = logging.getLogger(__name__)


def release_mapped_pages(array: object) -> None:
    """Drop the pages of a memory-mapped array that this process has read (no-op otherwise).

    Pages of a memmap that were read stay mapped and count as this process's memory until the
    kernel needs them back, so memory would grow with the dataset. The file stays in the page
    cache, so reading a page again costs no disk access.
    """
    mapping = getattr(array, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def array_sha256(array: np.ndarray) -> str:
    """sha256 of the array's bytes in C order, read a chunk at a time; the pages of a memmap
    are released as they are hashed, so hashing a large entry costs a chunk of memory."""
    digest = hashlib.sha256()
    flat = np.ascontiguousarray(array).reshape(-1)
    step = max(1, (1 << 24) // max(1, flat.itemsize))
    for start in range(0, flat.size, step):
        digest.update(np.ascontiguousarray(flat[start : start + step]).tobytes())
        release_mapped_pages(array)
    return digest.hexdigest()


class ArrayCache:
    """Arrays under ``root`` (created on first save, never at import)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def load(self, key: str, *, mapped: bool = True) -> tuple[np.ndarray, str] | None:
        """(array, its sha256), or None when absent or damaged (logged). ``mapped``: the array
        is memory-mapped; else read into memory once (never both, which would hold it twice)."""
        array_path, meta_path = self.root / f"{key}.npy", self.root / f"{key}.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            array = np.load(array_path, mmap_mode="r" if mapped else None, allow_pickle=False)
            digest = array_sha256(array)
        except (OSError, ValueError, EOFError) as err:
            log.warning("cache entry %s is unreadable (%s); recomputing", array_path, err)
            return None
        meta = meta if isinstance(meta, dict) else {}
        if list(array.shape) != meta.get("shape") or digest != meta.get("sha256"):
            log.warning("cache entry %s fails its checksum; recomputing", array_path)
            return None
        return array, digest

    def save(self, key: str, array: np.ndarray, parts: dict[str, Any]) -> str:
        """Store ``array`` with its checksum and key ``parts``; return the sha256."""
        self.root.mkdir(parents=True, exist_ok=True)
        array = np.ascontiguousarray(array)
        digest = array_sha256(array)
        sidecar = {"sha256": digest, "shape": list(array.shape), "dtype": str(array.dtype)}
        text = json.dumps({**sidecar, "parts": parts}, indent=1, sort_keys=True, default=str)
        self._atomic(self.root / f"{key}.npy", lambda fh: np.save(fh, array, allow_pickle=False))
        self._atomic(self.root / f"{key}.json", lambda fh: fh.write(text.encode()))
        return digest

    def _atomic(self, path: Path, write: Callable[[Any], Any]) -> None:
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".tmp-", delete=False) as tmp:
            try:
                write(tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            except BaseException:
                tmp.close()
                os.unlink(tmp.name)
                raise
        share_like_new_file(tmp.name)
        os.replace(tmp.name, path)

    def get_or_compute(
        self, parts: dict[str, Any], compute: Callable[[], np.ndarray]
    ) -> tuple[np.ndarray, str, bool]:
        """(array, sha256, cache_hit): the cached array, or ``compute()`` saved and mapped."""
        key = self.key(parts)
        cached = self.load(key)
        if cached is not None:
            return (*cached, True)
        digest = self.save(key, compute(), parts)
        return np.load(self.root / f"{key}.npy", mmap_mode="r"), digest, False
