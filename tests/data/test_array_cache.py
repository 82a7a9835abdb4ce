"""Arrays on disk stay on disk: hashing and loading a large entry costs a chunk of memory, not
the entry (or two of it)."""

from __future__ import annotations

import numpy as np
import pytest

from clinadapt.data.array_cache import ArrayCache, array_sha256, release_mapped_pages
from clinadapt.engine import FeatureCache
from memory_probe import mapped_kib, peak_growth_mib


def test_release_mapped_pages_drops_read_pages_and_keeps_memmaps_readable(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(256 * 16384, dtype=np.uint32).astype(np.uint8).reshape(256, 16384))
    images = np.load(path, mmap_mode="r")
    before = np.array(images)  # reads every page
    resident = mapped_kib(path)
    if resident is None:
        pytest.skip("needs /proc/self/smaps (Linux)")
    assert resident > 2000
    release_mapped_pages(images)
    assert mapped_kib(path) < resident / 4
    np.testing.assert_array_equal(images, before)
    release_mapped_pages(before)  # a plain array: nothing to release


def test_hashing_a_memmap_leaves_its_pages_released(tmp_path):
    path = tmp_path / "big.npy"
    array = np.arange(48 << 20, dtype=np.uint8)  # 48 MiB: three hashing chunks
    np.save(path, array)
    mapped = np.load(path, mmap_mode="r")
    assert array_sha256(mapped) == array_sha256(array)
    resident = mapped_kib(path)
    if resident is None:
        pytest.skip("needs /proc/self/smaps (Linux)")
    assert resident < 20 << 10  # at most about one chunk of 16 MiB, not 48


def test_loading_a_mapped_entry_keeps_it_on_disk(tmp_path):
    cache = ArrayCache(tmp_path)
    parts = {"what": "images"}
    cache.get_or_compute(parts, lambda: np.ones((48, 1 << 20), dtype=np.uint8))
    array, digest = cache.load(ArrayCache.key(parts))
    assert isinstance(array, np.memmap) and digest == array_sha256(np.ones((48, 1 << 20), "u1"))
    resident = mapped_kib(tmp_path / f"{ArrayCache.key(parts)}.npy")
    if resident is None:
        pytest.skip("needs /proc/self/smaps (Linux)")
    assert resident < 20 << 10  # the checksum read every page; they were released


def test_feature_cache_reads_an_entry_into_memory_once(tmp_path):
    parts = {"split": "train"}
    features = np.random.default_rng(0).standard_normal((1 << 14, 1024), dtype=np.float32)
    FeatureCache(tmp_path).get_or_compute(parts, lambda: features)  # 64 MiB entry
    loaded = FeatureCache(tmp_path).load(FeatureCache.key(parts))
    assert type(loaded) is np.ndarray  # not a memmap
    np.testing.assert_array_equal(loaded, features)
    growth = peak_growth_mib(
        f"from clinadapt.engine import FeatureCache\ncache = FeatureCache({str(tmp_path)!r})",
        f"x = cache.load(cache.key({parts!r}))",
    )
    # one copy of the 64 MiB entry; mapping it and copying it out would peak at two
    assert 60 < growth < 96
