"""On-disk feature cache keyed by everything that changes the features; corrupt entries rebuild.

The storage is ``data.array_cache.ArrayCache`` (``<key>.npy`` plus a checksummed ``<key>.json``
sidecar, both written atomically, the sidecar last); features are read into memory once (a mapped
file copied into memory would count twice at its peak) and their key carries a version that
changes when extraction changes in a way the key parts do not capture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.data.array_cache import ArrayCache, array_sha256
from clinadapt.engine import distributed
from clinadapt.paths import cache_home

__all__ = ["FeatureCache", "array_sha256", "default_cache_root"]

KEY_VERSION = 1  # bump when the extraction changes in a way the key parts do not capture


def default_cache_root() -> Path:
    """``$CLINADAPT_CACHE/features``, else ``~/.cache/clinadapt/features``."""
    return cache_home() / "features"


class FeatureCache(ArrayCache):
    """Features on disk under ``root`` (created on first save, never at import)."""

    def __init__(self, root: str | Path | None = None) -> None:
        super().__init__(root if root is not None else default_cache_root())

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        """sha256 of canonical JSON of the parts: backbone, weights_id, preprocess, precision,
        volume_mode, data checksum, split, ... (the caller lists everything that matters)."""
        return ArrayCache.key({"version": KEY_VERSION, "parts": parts})

    def load(self, key: str) -> np.ndarray | None:  # type: ignore[override]
        """The cached array in memory, or None when absent or damaged (logged, not raised)."""
        cached = super().load(key, mapped=False)
        return None if cached is None else cached[0]

    def get_or_compute(  # type: ignore[override]
        self, parts: dict[str, Any], compute: Callable[[], np.ndarray], *, shared: bool = False
    ) -> tuple[np.ndarray, bool]:
        """(array, cache_hit): the cached features, or ``compute()`` saved for next time.

        ``shared``, in a multi-process launch (every process calls it): the first process alone
        reads and writes the cache and every process gets its array; on a miss every process
        runs ``compute`` (an extraction split between them, ``extract_features(distributed=)``).
        """
        key = self.key(parts)
        if shared and distributed.launched():
            return self._shared(key, parts, compute)
        cached = self.load(key)
        if cached is not None:
            return cached, True
        array = np.ascontiguousarray(compute())
        self.save(key, array, parts)
        return array, False

    def _shared(
        self, key: str, parts: dict[str, Any], compute: Callable[[], np.ndarray]
    ) -> tuple[np.ndarray, bool]:
        first = distributed.rank() == 0
        cached = self.load(key) if first else None
        if distributed.from_first(cached is not None):
            return distributed.share_array(cached), True
        array = np.ascontiguousarray(compute())
        if first:
            self.save(key, array, parts)
        return array, False
