"""extract_features: equals a naive forward, streams batches, bf16 stays close, 3D pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinadapt.backbones import create_backbone
from clinadapt.engine import extract_features, slice_indices, volume_planes
from clinadapt.engine import precision as precision_module
from clinadapt.engine.features import unique_slices
from clinadapt.errors import ConfigError

rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 256, size=(37, 28, 28), dtype=np.uint8)


def naive(backbone, preprocess, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return backbone.embed(preprocess(images)).numpy()


class RecordingSource:
    """A lazy source that remembers how many items each request asked for."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.requests = images, []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        self.requests.append(len(index))
        return self.images[index]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("batch_size", [1, 5, 8, 64])
def test_matches_naive_forward_in_fp32(backbone, preprocess, batch_size):
    out = extract_features(
        backbone, IMAGES, preprocess, batch_size=batch_size, precision="fp32", progress=False
    )
    assert out.dtype == np.float32 and out.shape == (37, backbone.feature_dim)
    np.testing.assert_allclose(out, naive(backbone, preprocess, IMAGES), rtol=1e-4, atol=1e-5)


def test_cnn_runs_channels_last_with_the_same_features(backbone, preprocess):
    assert precision_module.memory_format_for(backbone) == torch.contiguous_format  # a ViT
    cnn = create_backbone("test_cnn", weights="none")
    assert precision_module.memory_format_for(cnn) == torch.channels_last
    reference = naive(cnn, preprocess, IMAGES)
    out = extract_features(cnn, IMAGES, preprocess, batch_size=16, precision="fp32",
                           progress=False)  # fmt: skip
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)


def test_streams_from_memmap_and_lazy_sources(backbone, preprocess, tmp_path):
    mm = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="w+", shape=IMAGES.shape)
    mm[:] = IMAGES
    mm.flush()
    reference = naive(backbone, preprocess, IMAGES)
    opts = {"batch_size": 8, "precision": "fp32", "progress": False}
    ro = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="r", shape=IMAGES.shape)
    np.testing.assert_allclose(
        extract_features(backbone, ro, preprocess, **opts), reference, atol=1e-5
    )
    source = RecordingSource(IMAGES)
    np.testing.assert_allclose(
        extract_features(backbone, source, preprocess, **opts), reference, atol=1e-5
    )
    assert max(source.requests) <= 8 and sum(source.requests[1:]) == len(IMAGES)


def test_colour_images(backbone, preprocess):
    colour = rng.integers(0, 256, size=(6, 28, 28, 3), dtype=np.uint8)
    out = extract_features(backbone, colour, preprocess, batch_size=4, precision="fp32",
                           progress=False)  # fmt: skip
    np.testing.assert_allclose(out, naive(backbone, preprocess, colour), atol=1e-5)


def test_bf16_is_close_to_fp32(backbone, preprocess):
    fp32 = extract_features(backbone, IMAGES, preprocess, precision="fp32", progress=False)
    bf16 = extract_features(backbone, IMAGES, preprocess, precision="bf16", progress=False)
    assert cosine(fp32, bf16).min() > 0.98


def naive_volume(backbone, preprocess, volume, mode, max_slices=None) -> np.ndarray:
    """Per-slice loop over one (D, H, W) volume."""
    axes = {"axial": [0], "coronal": [1], "sagittal": [2], "planes": [0, 1, 2]}[mode]
    feats = []
    for axis in axes:
        for i in slice_indices(volume.shape[axis], max_slices):
            image = np.take(volume, i, axis=axis)
            feats.append(naive(backbone, preprocess, image[None])[0])
    return np.mean(feats, axis=0)


@pytest.mark.parametrize("mode", ["axial", "coronal", "sagittal", "planes"])
@pytest.mark.parametrize("max_slices", [None, 3])
def test_volume_pooling_matches_per_slice_loop(backbone, preprocess, mode, max_slices):
    volumes = rng.integers(0, 256, size=(5, 6, 20, 16), dtype=np.uint8)  # non-cubic on purpose
    out = extract_features(
        backbone, volumes, preprocess, batch_size=7, precision="fp32", volume_mode=mode,
        max_slices=max_slices, progress=False,
    )  # fmt: skip
    expected = np.stack([naive_volume(backbone, preprocess, v, mode, max_slices) for v in volumes])
    assert out.shape == (5, backbone.feature_dim)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def mask_volumes(n: int, depth: int = 10, edge: int = 12) -> np.ndarray:
    """Shapes in empty space, like MedMNIST's 3D organ and vessel masks: most slices of every
    plane are empty, and two of the volumes are the same."""
    volumes = np.zeros((n, depth, edge, edge), dtype=np.uint8)
    for k in range(n):
        lo = 2 + k % 3
        volumes[k, lo : lo + 4, 3:8, 4 : 4 + k % 5 + 2] = rng.integers(1, 256, (4, 5, k % 5 + 2))
    volumes[-1] = volumes[0]
    return volumes


@pytest.mark.parametrize("mode", ["axial", "planes"])
def test_identical_slices_are_embedded_once_with_the_same_features(backbone, preprocess, mode):
    volumes = mask_volumes(6)
    seen = []

    def counting(batch):
        seen.append(len(batch))
        return preprocess(batch)

    out = extract_features(
        backbone, volumes, counting, batch_size=40, precision="fp32", volume_mode=mode,
        is_volume=True, progress=False,
    )  # fmt: skip
    expected = np.stack([naive_volume(backbone, preprocess, v, mode) for v in volumes])
    assert cosine(out, expected).min() > 0.9999
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    per_volume = sum(plane.shape[1] for plane in volume_planes(volumes[:1], mode))
    assert sum(seen) < len(volumes) * per_volume / 2  # fewer than half of the slices


def test_unique_slices_rebuild_the_stack():
    slices = np.stack([np.zeros((3, 4)), np.ones((3, 4)), np.zeros((3, 4)), -np.ones((3, 4))])
    distinct, inverse = unique_slices(slices)
    assert len(distinct) == 3
    np.testing.assert_array_equal(distinct[inverse], slices)
    floats = rng.random((5, 2, 2)).astype(np.float32)
    distinct, inverse = unique_slices(floats[[0, 1, 0, 4]])
    np.testing.assert_array_equal(distinct[inverse], floats[[0, 1, 0, 4]])
    assert len(distinct) == 3


def test_volume_detection_can_be_forced(backbone, preprocess):
    thin = rng.integers(0, 256, size=(2, 5, 12, 3), dtype=np.uint8)  # would look like colour
    out = extract_features(backbone, thin, preprocess, is_volume=True, precision="fp32",
                           progress=False)  # fmt: skip
    expected = np.stack([naive_volume(backbone, preprocess, v, "axial") for v in thin])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_slice_subsampling_spreads_evenly():
    assert slice_indices(28, None).tolist() == list(range(28))
    assert slice_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert slice_indices(4, 9).tolist() == [0, 1, 2, 3]


def test_empty_source_and_bad_options(backbone, preprocess):
    empty = np.zeros((0, 28, 28), dtype=np.uint8)
    assert extract_features(backbone, empty, preprocess, progress=False).shape == (0, 64)
    with pytest.raises(ConfigError, match="batch_size"):
        extract_features(backbone, IMAGES, preprocess, batch_size=0)
    with pytest.raises(ConfigError, match="volume_mode"):
        extract_features(backbone, IMAGES, preprocess, volume_mode="oblique", progress=False)
