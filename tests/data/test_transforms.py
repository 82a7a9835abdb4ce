import json

import numpy as np
import pytest
import torch

from clinadapt.data.transforms import PairResize, Preprocess, check_pixels
from clinadapt.errors import ConfigError, DataError

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def rand_u8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("size", [56, 224])
def test_nearest_upsampling_equals_pixel_repetition(size):
    batch = rand_u8(2, 28, 28)
    out = Preprocess(size, **IDENTITY)(batch)
    factor = size // 28
    expected = np.repeat(np.repeat(batch, factor, axis=1), factor, axis=2) / 255.0
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    for c in range(3):
        np.testing.assert_allclose(out[:, c].numpy(), expected, atol=1e-6)


def test_normalisation_and_float_input_match_uint8():
    batch = rand_u8(3, 28, 28, 3)
    pre = Preprocess(28, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    out = pre(batch)
    expected = (batch / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(pre(batch.astype(np.float32) / 255).numpy(), out.numpy(), atol=1e-6)


def test_channel_adaptation():
    gray = rand_u8(2, 28, 28, 1)
    out = Preprocess(28, **IDENTITY)(gray)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    rgb = rand_u8(2, 28, 28, 3)
    one = Preprocess(28, mean=(0.0,), std=(1.0,), channels=1)(rgb)
    assert one.shape == (2, 1, 28, 28)
    np.testing.assert_allclose(one[:, 0].numpy(), rgb.mean(axis=-1) / 255.0, atol=1e-6)


def test_bilinear_shrinking_is_antialiased():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)[None]
    out = Preprocess(16, resize="bilinear", **IDENTITY)(checker)
    np.testing.assert_allclose(out[0, 0, 2:-2, 2:-2].numpy(), 0.5, atol=0.03)
    grown = Preprocess(56, resize="bilinear", **IDENTITY)(rand_u8(1, 28, 28))
    assert grown.shape == (1, 3, 56, 56)


def test_pad_centres_the_image_in_zeros_before_normalisation():
    batch = rand_u8(2, 27, 27)
    pre = Preprocess(64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="pad")
    out = pre(batch).numpy() * 0.25 + 0.5  # back to pixel space
    top = (64 - 27) // 2
    expected = np.zeros((2, 64, 64))
    expected[:, top : top + 27, top : top + 27] = batch / 255.0
    for c in range(3):
        np.testing.assert_allclose(out[:, c], expected, atol=1e-6)


def test_pad_refuses_larger_images():
    with pytest.raises(ConfigError, match="nearest"):
        Preprocess(28, resize="pad", **IDENTITY)(rand_u8(1, 64, 64))


def test_invalid_options():
    with pytest.raises(ConfigError, match="Did you mean 'nearest'"):
        Preprocess(224, resize="neareset", **IDENTITY)
    with pytest.raises(ConfigError, match="1 or 3 values"):
        Preprocess(224, mean=(0.5, 0.5), std=(0.5, 0.5))
    assert Preprocess(224, mean=(0.5,), std=0.5).mean == (0.5, 0.5, 0.5)  # one value broadcasts
    with pytest.raises(ConfigError, match="positive"):
        Preprocess(224, mean=(0, 0, 0), std=(1, 0, 1))


@pytest.mark.parametrize(
    ("batch", "pattern"),
    [
        (np.full((1, 4, 4), np.nan, np.float32), "NaN"),
        (np.zeros((1, 4, 4), np.uint16), "uint8"),
        (np.zeros((1, 4, 4, 5), np.uint8), "shape"),
        (np.zeros((4, 4), np.uint8), "shape"),
    ],
)
def test_bad_batches(batch, pattern):
    with pytest.raises(DataError, match=pattern):
        Preprocess(8, **IDENTITY)(batch)


def test_tensor_input_and_describe():
    pre = Preprocess(32, mean=[0.1, 0.2, 0.3], std=[1, 1, 1], resize="pad")
    out = pre(torch.zeros(2, 16, 16, dtype=torch.uint8))
    assert out.shape == (2, 3, 32, 32)
    description = pre.describe()
    assert description == {
        "input_size": 32,
        "resize": "pad",
        "mean": [0.1, 0.2, 0.3],
        "std": [1.0, 1.0, 1.0],
        "channels": 3,
    }
    assert json.dumps(description) and hash(pre)


def test_check_pixels_names_the_image(tmp_path):
    check_pixels(np.zeros((3, 4, 4), np.uint8), "ok")
    arr = np.lib.format.open_memmap(tmp_path / "a.npy", "w+", np.float32, (5, 4, 4))
    arr[3, 1, 1] = np.inf
    with pytest.raises(DataError, match="where: image 3"):
        check_pixels(arr, "where")


# Segmentation pairs ---------------------------------------------------------------------------


def test_pair_resize_keeps_mask_values_and_records_protocol():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:20, 10:30] = 2
    mask[22:26, 2:6] = 1
    resize = PairResize(16)
    small_image, small_mask = resize(image, mask)
    assert small_image.shape == (16, 16, 3) and small_image.dtype == np.uint8
    assert small_mask.shape == (16, 16) and set(np.unique(small_mask)) == {0, 1, 2}
    assert resize.restore(small_mask, (30, 40)).shape == (30, 40)
    assert resize.describe() == {
        "size": 16,
        "resize": "linear",
        "image": "bilinear/trilinear (antialiased when a 2D image shrinks)",
        "mask": "nearest",
    }
    volume = rng.random((9, 12, 10)).astype(np.float32)
    labels = (volume > 0.7).astype(np.int64)
    v, m = PairResize((8, 8, 8))(volume, labels)
    assert v.shape == m.shape == (8, 8, 8) and v.dtype == np.float32 and m.dtype == np.int64
    assert set(np.unique(m)) <= {0, 1}


def test_pair_resize_pad_round_trips_and_refuses_large_cases():
    image = np.full((10, 12), 200, dtype=np.uint8)
    mask = np.eye(10, 12, dtype=np.uint8)
    resize = PairResize((16, 16), "pad")
    padded_image, padded_mask = resize(image, mask)
    assert padded_image[0, 0] == 0 and padded_image[3:13, 2:14].min() == 200
    assert (resize.restore(padded_mask, (10, 12)) == mask).all()
    assert resize.describe()["mask"] == "zero padding"
    with pytest.raises(ConfigError, match="cannot fit"):
        PairResize(8, "pad")(image, mask)
    with pytest.raises(ConfigError, match="not one of"):
        PairResize(8, "bicubic")
    with pytest.raises(DataError, match="spatial shape"):
        PairResize(8)(image, mask[:5])
