"""FeatureCache: hits and misses, keys that change with every part, corrupt entries rebuilt."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from clinadapt.engine import FeatureCache, default_cache_root

PARTS = {
    "backbone": "test_vit",
    "weights_id": "none",
    "preprocess": "size=32 nearest mean=0.5 std=0.5",
    "precision": "fp32",
    "volume_mode": "axial",
    "data_md5": "0123abcd",
    "split": "train",
}
FEATS = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return FEATS.copy()


def test_miss_then_hit(tmp_path):
    cache, compute = FeatureCache(tmp_path / "features"), Counter()
    first, hit1 = cache.get_or_compute(PARTS, compute)
    second, hit2 = cache.get_or_compute(dict(reversed(PARTS.items())), compute)
    assert (hit1, hit2, compute.calls) == (False, True, 1)
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.float32
    assert not list((tmp_path / "features").glob(".tmp-*"))  # no temporary files left


@pytest.mark.parametrize("part", sorted(PARTS))
def test_key_changes_with_each_part(part):
    changed = {**PARTS, part: PARTS[part] + "-other"}
    assert FeatureCache.key(changed) != FeatureCache.key(PARTS)


def test_key_ignores_dict_order():
    assert FeatureCache.key(dict(reversed(PARTS.items()))) == FeatureCache.key(PARTS)


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar"])
def test_corrupt_entry_is_detected_and_recomputed(tmp_path, caplog, damage):
    cache, compute = FeatureCache(tmp_path), Counter()
    cache.get_or_compute(PARTS, compute)
    key = FeatureCache.key(PARTS)
    array_file, meta_file = tmp_path / f"{key}.npy", tmp_path / f"{key}.json"
    data = bytearray(array_file.read_bytes())
    if damage == "truncate":
        array_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[-5] ^= 0xFF  # same size, different value: only the checksum can tell
        array_file.write_bytes(bytes(data))
    else:
        meta_file.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="clinadapt.engine.cache"):
        assert cache.load(key) is None
    assert "recomputing" in caplog.text
    _, hit = cache.get_or_compute(PARTS, compute)
    assert (hit, compute.calls) == (False, 2)
    np.testing.assert_array_equal(cache.load(key), FEATS)


def test_root_created_on_first_save_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINADAPT_CACHE", str(tmp_path / "home"))
    cache = FeatureCache()
    assert cache.root == default_cache_root() == tmp_path / "home" / "features"
    assert cache.load(FeatureCache.key(PARTS)) is None
    assert not (tmp_path / "home").exists()
    cache.save(FeatureCache.key(PARTS), FEATS, PARTS)
    assert cache.root.is_dir()
