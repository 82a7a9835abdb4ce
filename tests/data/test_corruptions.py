"""The real MedMNIST-C corruptions (skipped without medmnistc and ImageMagick): every corruption
of the datasets we shift runs with our NumPy and scikit-image, the motion-blur repair gives
medmnistc's pixels, and the smallest sizes stated for mark-drawing corruptions are exact."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip(
    "medmnistc.corruptions.registry",
    reason="medmnistc not installed (clinadapt[shift], --no-deps medmnistc, MagickWand library)",
    exc_type=ImportError,  # Wand raises ImportError when the MagickWand library is missing
)

from clinadapt.data import load_dataset
from clinadapt.data.corruptions import (
    available_corruptions,
    corrupt,
    corruptions_for,
)
from clinadapt.data.shifts import shifted_test_split

SHIFTED = ("breastmnist", "pneumoniamnist", "retinamnist")


@pytest.fixture(autouse=True)
def _one_thread():
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield
    cv2.setNumThreads(threads)


def images(n: int, size: int, colour: bool, seed: int = 0) -> np.ndarray:
    shape = (n, size, size, 3) if colour else (n, size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("dataset", SHIFTED)
def test_every_corruption_runs_at_28_px_and_repeats_under_its_seed(dataset):
    colour = dataset == "retinamnist"
    clean = images(3, 28, colour)
    runnable = available_corruptions(dataset, 28)
    assert all(severities == (1, 2, 3, 4, 5) for severities in runnable.values())
    for name, corruption in corruptions_for(dataset).items():
        for severity in (1, 5):
            out = corrupt(clean, corruption, severity, seed=7)
            assert out.shape == clean.shape and out.dtype == np.uint8, name
            np.testing.assert_array_equal(out, corrupt(clean, corruption, severity, seed=7))


def test_motion_blur_gives_medmnistc_pixels_at_224_and_the_right_shape_at_28(monkeypatch):
    motion = corruptions_for("breastmnist")["motion_blur"]
    from medmnistc.corruptions.registry import CORRUPTIONS_DS

    library = CORRUPTIONS_DS["breastmnist"]["motion_blur"]
    # medmnistc decodes with np.fromstring, whose binary mode NumPy 2 removed
    monkeypatch.setattr(np, "fromstring", lambda b, dtype: np.frombuffer(b, dtype), raising=False)
    for colour in (True, False):
        image = Image.fromarray(images(1, 224, colour)[0]).convert("RGB")
        np.random.seed(3)
        theirs = np.asarray(library.apply(image, 2))
        np.random.seed(3)
        ours = motion.apply(image, 3, np.random.default_rng(0))
        np.testing.assert_array_equal(ours, theirs)
    grey = Image.fromarray(images(1, 28, False)[0]).convert("RGB")
    assert np.asarray(library.apply(grey, 2)).shape != (28, 28, 3)  # medmnistc's own result
    assert motion.apply(grey, 3, np.random.default_rng(0)).shape == (28, 28, 3)


@pytest.mark.parametrize(
    ("dataset", "name", "severity"),
    [
        ("pathmnist", "stain_deposit", 1),
        ("pathmnist", "bubble", 5),
        ("dermamnist", "characters", 1),
    ],
)
def test_the_smallest_size_of_mark_drawing_corruptions_is_exact(dataset, name, severity):
    corruption = corruptions_for(dataset)[name]
    size = corruption.min_size[severity - 1]
    assert corrupt(images(100, size, True), corruption, severity, seed=0).shape[1] == size
    with pytest.raises(ValueError, match="empty range"):
        corrupt(images(100, size - 1, True), corruption, severity, seed=0)
    assert severity not in available_corruptions(dataset, size - 1)[name]
    assert severity in available_corruptions(dataset, size)[name]


@pytest.mark.shared
def test_real_breastmnist_under_every_corruption(shared_medmnist, tmp_path):
    ds = load_dataset("breastmnist", root=shared_medmnist)
    split = shifted_test_split(ds, "medmnistc:all:3", cache_dir=tmp_path)
    n = len(ds["test"])
    assert split.images.shape == (7 * n, 28, 28) and split.provenance["left_out"] == {}
    clean = np.asarray(ds["test"].images, dtype=np.float64)
    for block in split.provenance["blocks"]:
        shifted = np.asarray(split.images[block["start"] : block["stop"]], dtype=np.float64)
        assert np.abs(shifted - clean).mean() > 0.5, block["corruption"]
