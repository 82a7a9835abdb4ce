"""Fixtures for the data tests: small MedMNIST-style npz files and the shared real data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from .toy import toy_arrays

SHARED_MEDMNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "medmnist"


@pytest.fixture
def shared_medmnist() -> Path:
    if not SHARED_MEDMNIST.is_dir():
        pytest.skip(f"real MedMNIST files not found at {SHARED_MEDMNIST} (../shared/data absent)")
    return SHARED_MEDMNIST


@pytest.fixture
def write_npz() -> Callable[..., Path]:
    def write(path: Path, arrays: dict[str, np.ndarray] | None = None, **kw) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **(arrays if arrays is not None else toy_arrays(**kw)))
        return path

    return write
