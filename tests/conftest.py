"""Keep tests hermetic (no user cache, data or weights folders leak in); shared fixtures."""

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data" / "medmnist"
SHARED_WEIGHTS = SHARED / "weights"


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLINADAPT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("CLINADAPT_DATA", raising=False)
    monkeypatch.delenv("CLINADAPT_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared CPUs: thread contention costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_swin():
    """A two-stage Swin small enough for CPU tests (32 px input, 32 channels at stride 8)."""
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=0,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=4,
        img_size=32,
    )
