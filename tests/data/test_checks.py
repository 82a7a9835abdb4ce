"""The pixel contract every reader enforces: uint8 in [0, 255], or finite float in [0, 1]."""

import numpy as np
import pytest

from clinadapt.data import checks
from clinadapt.data.checks import check_pixels
from clinadapt.errors import DataError


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((2, 4, 4), np.uint8),
        np.linspace(0, 1, 32, dtype=np.float32).reshape(2, 4, 4),
        np.full((2, 4, 4), 1 + 1e-7, np.float64),  # rounding noise from a rescale
        np.full((2, 4, 4), -1e-7, np.float16),
        np.zeros((0, 4, 4), np.float32),
    ],
)
def test_contract_images_pass(array):
    check_pixels(array, "ok")


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ((0.0, 255.0), r"range from 0 to 255"),
        ((-1.0, 1.0), r"range from -1 to 1\b"),
        ((0.0, 1e6), r"range from 0 to 1e\+06"),
        ((0.0, 1.001), r"range from 0 to 1\.001"),
    ],
)
def test_float_images_outside_unit_range_are_refused(values, pattern):
    images = np.full((3, 4, 4), 0.5, np.float32)
    images[1, 0, 0], images[1, 1, 1] = values
    with pytest.raises(DataError, match=pattern) as err:
        check_pixels(images, "scan.npz: images")
    message = str(err.value)
    assert message.startswith("scan.npz: images") and "image 1" in message
    assert "rescale" in message.lower() and "uint8" in message


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.bool_, np.complex64])
def test_other_pixel_types_are_refused_with_what_to_store(dtype):
    pattern = r"where: .*dtype .*uint8 in \[0, 255\] or float in \[0, 1\]"
    with pytest.raises(DataError, match=pattern):
        check_pixels(np.zeros((2, 4, 4), dtype), "where")


class RecordingReads:
    """An array stand-in that records how many images each slice read returns."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.reads = array, []
        self.dtype, self.ndim, self.shape = array.dtype, array.ndim, array.shape

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        out = self.array[index]
        if isinstance(index, slice):
            self.reads.append(len(out))
        return out


def test_memory_mapped_floats_are_scanned_a_chunk_at_a_time(tmp_path, monkeypatch):
    images = np.lib.format.open_memmap(tmp_path / "a.npy", "w+", np.float32, (40, 8, 8))
    images[:] = 0.5
    images[37, 2, 2] = 200.0  # in the last chunk
    images.flush()
    mapped = RecordingReads(np.load(tmp_path / "a.npy", mmap_mode="r"))
    monkeypatch.setattr(checks, "_CHECK_BYTES", 8 * 8 * 4 * 5)  # five images per chunk
    with pytest.raises(DataError, match=r"range from 0\.5 to 200 .*image 37"):
        check_pixels(mapped, "a.npy")
    assert mapped.reads == [5] * 8
