"""A frozen run on all labels of a large training split fits on the extracted features as they
are: no copy of them beyond the method's own float64 working copy."""

from __future__ import annotations

import tracemalloc

import numpy as np

from clinadapt.data.info import TaskType
from clinadapt.data.synthetic import synthetic_info
from clinadapt.runner.experiment import ExperimentConfig, FeatureBundle, run_on_features

N_TRAIN, DIM = 40_000, 128  # 20 MiB of float32 training features


def _bundle() -> FeatureBundle:
    rng = np.random.default_rng(0)
    sizes = {"train": N_TRAIN, "val": 500, "test": 500}
    features, labels = {}, {}
    for split, n in sizes.items():
        y = np.arange(n) % 2
        features[split] = rng.standard_normal((n, DIM), dtype=np.float32) + y[:, None]
        labels[split] = y[:, None].astype(np.int64)
    info = synthetic_info("big", TaskType.BINARY, 2, 1, 2, sizes, (28,))
    return FeatureBundle(
        info=info,
        features=features,
        labels=labels,
        provenance={},
        backbone={"name": "features"},
        preprocessing={},
        timings={},
        cache_hits={},
        key="big",
    )


def test_all_shots_fit_on_the_features_without_copying_them():
    bundle = _bundle()
    cfg = ExperimentConfig(
        dataset="synthetic-binary",
        method="prototype",
        shots="all",
        bootstrap=0,
        reliability_diagram=False,
    )
    run_on_features(ExperimentConfig(**{**vars(cfg), "shots": "2"}), bundle)  # imports
    tracemalloc.start()
    try:
        record = run_on_features(cfg, bundle)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert record["shots"]["support_size"] == N_TRAIN and record["metrics"]["test"]["auc"] > 0.9
    # the prototype's float64 copy is 40 MiB; indexing all rows first added 20 MiB more
    assert peak < 1.3 * N_TRAIN * DIM * 8
