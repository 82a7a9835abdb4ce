"""Frozen-feature runs under a multi-process launch, also used by the distributed test:

    torchrun --nproc_per_node 2 tests/runner/distributed_script.py OUT_DIR

Each process writes ``rank<N>.npz`` (its features of every split), ``rank<N>.json`` (how many
images it embedded, how many cache entries it wrote) and runs a small bench grid into
``OUT_DIR/bench``; the cache is ``OUT_DIR/cache``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from clinadapt.engine import features as features_module
from clinadapt.engine.cache import FeatureCache
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.experiment import ExperimentConfig, prepare_features

OPTIONS = {"dataset": "synthetic-binary", "backbone": "test_cnn", "weights": "none"}


def grid(cache: str) -> GridConfig:
    return GridConfig(
        datasets=[OPTIONS["dataset"]],
        backbones=[OPTIONS["backbone"]],
        weights=[OPTIONS["weights"]],
        methods=["knn", "prototype"],
        shots=["2", "all"],
        seeds=1,
        base={"bootstrap": 20, "reliability_diagram": False, "cache_dir": cache},
    )


def counting(counts: dict[str, int]) -> None:
    """Count the images this process embeds and the cache entries it writes."""
    embed, save = features_module._Embedder.__call__, FeatureCache.save

    def counted_embed(self, images):
        counts["embedded"] += len(images)
        return embed(self, images)

    def counted_save(self, key, array, parts):
        counts["saved"] += 1
        return save(self, key, array, parts)

    features_module._Embedder.__call__ = counted_embed
    FeatureCache.save = counted_save


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    counts = {"embedded": 0, "saved": 0}
    counting(counts)
    cache = str(out / "cache")
    bundle = prepare_features(ExperimentConfig(**OPTIONS, cache_dir=cache), progress=False)
    np.savez(out / f"rank{rank}.npz", **bundle.features)
    (out / f"rank{rank}.json").write_text(json.dumps({**counts, "hits": bundle.cache_hits}))
    run_grid(grid(cache), out / "bench", progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
