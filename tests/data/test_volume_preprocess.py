"""VolumePreprocess: (B, D, H, W) volumes -> normalised (B, C, S, S, S), checked against naive
numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinadapt.data.transforms import VolumePreprocess
from clinadapt.errors import ConfigError, DataError


def rand_u8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_nearest_upsampling_repeats_every_voxel():
    batch = rand_u8(2, 28, 28, 28)
    out = VolumePreprocess(56, mean=0.0, std=1.0)(batch)
    assert out.shape == (2, 1, 56, 56, 56) and out.dtype == torch.float32
    expected = batch.repeat(2, axis=1).repeat(2, axis=2).repeat(2, axis=3) / 255.0
    np.testing.assert_allclose(out[:, 0].numpy(), expected, atol=1e-6)


def test_normalisation_channels_and_float_input():
    batch = rand_u8(2, 8, 8, 8)
    pre = VolumePreprocess(8, mean=0.5, std=(0.25,), channels=3)
    out = pre(batch)
    assert out.shape == (2, 3, 8, 8, 8) and out.is_contiguous()
    expected = (batch / 255.0 - 0.5) / 0.25
    for c in range(3):
        np.testing.assert_allclose(out[:, c].numpy(), expected, atol=1e-5)
    as_float = pre(torch.from_numpy(batch.astype(np.float32) / 255))
    torch.testing.assert_close(as_float, out)
    per_channel = VolumePreprocess(8, mean=(0.1, 0.2, 0.3), std=(1, 2, 4), channels=3)(batch)
    np.testing.assert_allclose(per_channel[:, 2].numpy(), (batch / 255.0 - 0.3) / 4, atol=1e-6)


def test_pad_centres_the_volume_in_zeros_before_normalisation():
    batch = rand_u8(1, 5, 6, 7)
    out = VolumePreprocess(10, mean=0.5, std=0.5, resize="pad")(batch).numpy() * 0.5 + 0.5
    expected = np.zeros((1, 10, 10, 10))
    expected[:, 2:7, 2:8, 1:8] = batch / 255.0
    np.testing.assert_allclose(out[:, 0], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="cannot fit 5x6x7"):
        VolumePreprocess(6, mean=0, std=1, resize="pad")(batch)


def test_trilinear_keeps_constant_volumes_and_sizes():
    out = VolumePreprocess(20, mean=0.0, std=1.0, resize="trilinear")(np.full((1, 8, 9, 10), 0.25))
    assert out.shape == (1, 1, 20, 20, 20)
    np.testing.assert_allclose(out.numpy(), 0.25, atol=1e-6)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_nan_or_inf_voxels_are_a_data_error(as_tensor):
    batch = np.zeros((3, 4, 4, 4), dtype=np.float32)
    batch[1, 2, 2, 2] = np.nan if as_tensor else np.inf
    with pytest.raises(DataError, match="NaN or infinite"):
        VolumePreprocess(4, mean=0, std=1)(torch.from_numpy(batch) if as_tensor else batch)


def test_bad_inputs_and_options():
    pre = VolumePreprocess(4, mean=0, std=1)
    with pytest.raises(DataError, match=r"\(B, D, H, W\)"):
        pre(rand_u8(2, 4, 4))
    with pytest.raises(DataError, match="uint8"):
        pre(np.zeros((1, 4, 4, 4), dtype=np.int32))
    with pytest.raises(ConfigError, match="Did you mean 'trilinear'"):
        VolumePreprocess(4, mean=0, std=1, resize="trilinar")
    with pytest.raises(ConfigError, match="needs 1 or 3 values"):
        VolumePreprocess(4, mean=(0, 0), std=1, channels=3)
    with pytest.raises(ConfigError, match="positive"):
        VolumePreprocess(4, mean=0, std=0)


def test_describe_and_hashable():
    pre = VolumePreprocess(28, mean=0.0, std=2.0)
    assert pre.describe() == {
        "input_size": 28,
        "resize": "nearest",
        "mean": [0.0],
        "std": [2.0],
        "channels": 1,
        "ndim": 3,
    }
    assert hash(pre) == hash(VolumePreprocess(28, mean=(0.0,), std=[2.0]))
