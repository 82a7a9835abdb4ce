"""Keep tests hermetic: no user cache, data or weights folders leak in."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data" / "medmnist"
SHARED_WEIGHTS = SHARED / "weights"


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLINADAPT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("CLINADAPT_DATA", raising=False)
    monkeypatch.delenv("CLINADAPT_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
