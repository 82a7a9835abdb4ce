"""Frozen-feature methods on a large support set hold one float64 copy of it at most: no second
copy while normalising, centring or standardising, and no temporaries of its size."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from clinadapt.adapt import create_method
from clinadapt.data.info import TaskType

N, DIM = 40_000, 128  # 20 MiB of float32 features, 40 MiB as float64


def _peak(call) -> float:
    """Peak bytes ``call()`` allocates beyond what is held when it starts."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["knn", "prototype", "linear"])
def test_fit_and_predict_hold_one_float64_copy_of_the_features(name):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (N, 1))
    features = rng.standard_normal((N, DIM), dtype=np.float32) + labels.astype(np.float32)
    queries = features[:4000].copy()
    before = features.copy()
    method = create_method(name, {"c_grid": [1.0]} if name == "linear" else {})
    float64_copy = N * DIM * 8
    fit = _peak(lambda: method.fit(features, labels, TaskType.BINARY, 2, seed=0))
    assert fit < 1.3 * float64_copy  # before: two to three copies (normalised, centred, scaled)
    predict = _peak(lambda: method.predict_proba(queries))
    assert predict < 160 * 2**20  # k-NN: blocks of 4M similarities (before: 16M, 540 MB)
    np.testing.assert_array_equal(features, before)  # the caller's features are untouched


def test_knn_converts_queries_a_block_at_a_time():
    rng = np.random.default_rng(0)
    support, labels = rng.standard_normal((1000, 64)), rng.integers(0, 2, (1000, 1))
    queries = rng.standard_normal((400_000, 64), dtype=np.float32)  # 100 MiB
    method = create_method("knn", {}).fit(support, labels, TaskType.BINARY, 2)
    predict = _peak(lambda: method.predict_proba(queries))
    assert predict < queries.size * 8  # less than a float64 copy of them (before: 1.7 copies)
