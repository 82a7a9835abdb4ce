"""On-disk feature cache keyed by everything that changes the features; corrupt entries rebuild.

An entry is ``<key>.npy`` plus ``<key>.json`` (array sha256, shape, dtype, key parts). Both are
written to a temporary file and renamed into place, the sidecar last, so a crash never leaves
an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.paths import cache_home, share_like_new_file

log = logging.getLogger(__name__)
KEY_VERSION = 1  # bump when the extraction changes in a way the key parts do not capture


def default_cache_root() -> Path:
    """``$CLINADAPT_CACHE/features``, else ``~/.cache/clinadapt/features``."""
    return cache_home() / "features"


def array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class FeatureCache:
    """Features on disk under ``root`` (created on first save, never at import)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        """sha256 of canonical JSON of the parts: backbone, weights_id, preprocess, precision,
        volume_mode, data checksum, split, ... (the caller lists everything that matters)."""
        canonical = json.dumps(
            {"version": KEY_VERSION, "parts": parts},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def load(self, key: str) -> np.ndarray | None:
        """The cached array, or None when absent or damaged (damage is logged, not raised)."""
        array_path, meta_path = self._paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            array = np.load(array_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            log.warning("feature cache entry %s is unreadable (%s); recomputing", array_path, err)
            return None
        meta = meta if isinstance(meta, dict) else {}
        if list(array.shape) != meta.get("shape") or array_sha256(array) != meta.get("sha256"):
            log.warning("feature cache entry %s fails its checksum; recomputing", array_path)
            return None
        return array

    def save(self, key: str, array: np.ndarray, meta: dict[str, Any]) -> Path:
        """Store ``array`` atomically with its checksum and ``meta`` (normally the key parts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        array_path, meta_path = self._paths(key)
        array = np.ascontiguousarray(array)
        sidecar = {
            "sha256": array_sha256(array),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "meta": meta,
        }
        self._atomic(array_path, lambda fh: np.save(fh, array, allow_pickle=False))
        text = json.dumps(sidecar, indent=1, sort_keys=True, default=str)
        self._atomic(meta_path, lambda fh: fh.write(text.encode()))
        return array_path

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
    ) -> tuple[np.ndarray, bool]:
        """(array, cache_hit): the cached features, or ``compute()`` saved for next time."""
        key = self.key(parts)
        cached = self.load(key)
        if cached is not None:
            return cached, True
        array = compute()
        self.save(key, array, parts)
        return array, False
