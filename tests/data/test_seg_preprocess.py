"""SegmentationPreprocess (cases and masks to one network batch) and VolumeSlices (volumes as
axial-slice cases), checked against naive references."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from clinadapt.data import slices as slices_module
from clinadapt.data.slices import VolumeSlices
from clinadapt.data.transforms import (
    PairResize,
    Preprocess,
    SegmentationPreprocess,
    VolumePreprocess,
)
from clinadapt.errors import DataError

HALF = (0.5, 0.5, 0.5)


def flat(size=16, mode="linear"):
    resize = "bilinear" if mode == "linear" else mode
    return SegmentationPreprocess(PairResize(size, mode), Preprocess(size, HALF, HALF, resize))


def cube(size=8, mode="pad"):
    resize = {"linear": "trilinear"}.get(mode, mode)
    return SegmentationPreprocess(PairResize(size, mode), VolumePreprocess(size, 0.0, 1.0, resize))


def nearest_reference(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-exact by hand: output index i reads input index floor((i + 0.5) * n / N)."""
    out = np.zeros(shape, mask.dtype)
    for pos in np.ndindex(*shape):
        src = tuple(
            min(int((i + 0.5) * n / m), n - 1)
            for i, n, m in zip(pos, mask.shape, shape, strict=True)
        )
        out[pos] = mask[src]
    return out


def cases(channels=(3,), seed=0):
    """Two cases of other sizes than the network's (one larger, one smaller), labels 0, 2, 5."""
    rng = np.random.default_rng(seed)
    images = [
        rng.integers(0, 256, (12, 20, *channels), dtype=np.uint8),
        rng.integers(0, 256, (22, 9, *channels), dtype=np.uint8),
    ]
    masks = [rng.choice([0, 2, 5], size=image.shape[:2]).astype(np.uint8) for image in images]
    return images, masks


@pytest.mark.parametrize("channels", [(), (3,)], ids=["gray", "colour"])
def test_images_and_masks_reach_the_network_shape_masks_nearest(channels):
    pre = flat(16)
    images, masks = cases(channels)
    x, y = pre(images, masks)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (2, 16, 16) and y.dtype == torch.int64
    for i in range(2):
        assert set(np.unique(y[i].numpy())) <= {0, 2, 5}  # never an interpolated label
        np.testing.assert_array_equal(y[i].numpy(), nearest_reference(masks[i], (16, 16)))
        # images: the pair's linear resize, then only normalised (not resized again)
        image, _ = pre.pair(images[i], masks[i])
        assert image.shape[:2] == (16, 16)
        expected = pre.normalise(image[None])[0]
        torch.testing.assert_close(x[i], expected)
    if not channels:  # grayscale repeated to the backbone's 3 channels
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_pad_mode_centres_images_and_masks():
    pre = flat(16, "pad")
    image = np.full((10, 12), 200, np.uint8)
    mask = np.ones((10, 12), np.uint8)
    x, y = pre([image], [mask])
    expected = np.zeros((16, 16), np.int64)
    expected[3:13, 2:14] = 1
    np.testing.assert_array_equal(y[0].numpy(), expected)
    outside = (0.0 - 0.5) / 0.5
    assert torch.all(x[0, :, y[0] == 0] == outside)
    assert torch.allclose(x[0, :, y[0] == 1], torch.tensor((200 / 255 - 0.5) / 0.5))


def test_without_masks_y_is_zeros_and_x_unchanged():
    pre = flat(16)
    images, masks = cases()
    x, y = pre(images)
    assert y.shape == (2, 16, 16) and y.dtype == torch.int64 and not y.any()
    torch.testing.assert_close(x, pre(images, masks)[0])


def test_volumes_reach_a_volume_network_whole():
    pre = cube(8, "pad")
    rng = np.random.default_rng(1)
    volume = rng.random((5, 7, 6)).astype(np.float32)
    mask = rng.choice([0, 1, 3], size=(5, 7, 6)).astype(np.uint8)
    x, y = pre([volume], [mask])
    assert x.shape == (1, 1, 8, 8, 8) and y.shape == (1, 8, 8, 8) and pre.ndim == 3
    np.testing.assert_array_equal(y[0, 1:6, 0:7, 1:7].numpy(), mask)
    np.testing.assert_allclose(x[0, 0, 1:6, 0:7, 1:7].numpy(), volume, atol=1e-6)
    assert int(y.sum()) == int(mask.sum())


@pytest.mark.parametrize(
    "image, mask, shape",
    [
        (np.zeros((5, 12, 12), np.uint8), np.zeros((5, 12, 12), np.uint8), "(5, 12, 12)"),
        (np.zeros((3, 12, 10), np.uint8), np.zeros((3, 12, 10), np.uint8), "(3, 12, 10)"),
        (np.zeros((6, 12, 3), np.uint8), np.zeros((6, 12, 3), np.uint8), "(6, 12, 3)"),
        (np.zeros((5, 12, 12), np.uint8), None, "(5, 12, 12)"),
        (np.zeros((2, 5, 12, 12), np.uint8), None, "(2, 5, 12, 12)"),
    ],
    ids=["volume", "three-slice-volume", "three-wide-volume", "volume-without-mask", "4d"],
)
def test_a_3d_case_to_a_2d_network_is_a_clear_error(image, mask, shape):
    with pytest.raises(
        DataError, match=rf"images \(H, W\).*got a case of shape {re.escape(shape)}.*slice"
    ):
        flat(16)([image], None if mask is None else [mask])


def test_a_2d_case_to_a_3d_network_is_a_clear_error():
    with pytest.raises(DataError, match=r"volumes \(D, H, W\).*got a case of shape \(12, 12\)"):
        cube(8)([np.zeros((12, 12), np.uint8)], [np.zeros((12, 12), np.uint8)])
    with pytest.raises(DataError, match=r"got a case of shape \(4, 6, 6, 3\)"):
        cube(8)([np.zeros((4, 6, 6, 3), np.uint8)])


def test_single_channel_images_are_images():
    x, y = flat(16)([np.zeros((12, 10, 1), np.uint8)], [np.zeros((12, 10), np.uint8)])
    assert x.shape == (1, 3, 16, 16) and y.shape == (1, 16, 16)


def test_an_image_and_mask_of_different_sizes_are_refused():
    with pytest.raises(DataError, match="mask must have the shape of its image"):
        flat(16)([np.zeros((12, 12), np.uint8)], [np.zeros((12, 11), np.uint8)])


def test_describe_names_the_pair_resize_and_the_normalisation():
    assert flat(16).describe() == {
        "input_size": 16,
        "resize": "linear",
        "mean": list(HALF),
        "std": list(HALF),
        "channels": 3,
        "size": 16,
        "image": "bilinear/trilinear (antialiased when a 2D image shrinks)",
        "mask": "nearest",
    }
    described = cube(8).describe()
    assert described["ndim"] == 3 and described["resize"] == "pad"
    assert described["mask"] == "zero padding" and described["size"] == 8
    assert flat(16).ndim == 2


class CountingVolumes:
    """Volumes that count how often each is read (module level, so it pickles)."""

    def __init__(self, volumes):
        self.volumes, self.reads = volumes, [0] * len(volumes)

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, i):
        self.reads[i] += 1
        return self.volumes[i]


def volumes(depths=(2, 3, 1)):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 9, (d, 4, 5), dtype=np.uint8) for d in depths]


def test_volume_slices_run_through_every_slice_of_each_volume_in_order():
    vols = volumes()
    source = VolumeSlices(CountingVolumes(vols), [2, 3, 1])
    assert len(source) == 6
    expected = [vols[v][s] for v in range(3) for s in range(len(vols[v]))]
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(source[i], want)
    np.testing.assert_array_equal(source[np.int64(4)], vols[1][2])


def test_volume_slices_read_each_volume_once_while_it_stays_cached(monkeypatch):
    counted = CountingVolumes(volumes())
    source = VolumeSlices(counted, [2, 3, 1])
    for i in [2, 0, 3, 1, 4, 5, 2]:
        source[i]
    assert counted.reads == [1, 1, 1]
    monkeypatch.setattr(slices_module, "CACHED_VOLUMES", 1)
    counted = CountingVolumes(volumes())
    source = VolumeSlices(counted, [2, 3, 1])
    for i in [0, 1, 2, 0, 5, 5]:
        source[i]
    assert counted.reads == [2, 1, 1]  # volume 0 was evicted by volume 1, then read again


def test_pickled_volume_slices_drop_the_cache_and_keep_the_items():
    source = VolumeSlices(CountingVolumes(volumes()), [2, 3, 1])
    first = [source[i].copy() for i in range(len(source))]
    assert source._cache
    clone = pickle.loads(pickle.dumps(source))
    assert not clone._cache and source._cache and len(clone) == len(source)
    for i, want in enumerate(first):
        np.testing.assert_array_equal(clone[i], want)
