"""Few-shot sweep on cached features versus re-extracting features for every run.

Target: the cached sweep at least 20x faster than the same sweep re-extracting features.
The uncached sweep is not run (it would take n_runs extractions); its time is the measured
extraction time times the number of runs plus the measured fitting time of every run.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

from _common import default_data_root, default_weights, write_result
from clinadapt.runner.experiment import ExperimentConfig, prepare_features, run_on_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", default=None, help="default: local weights, else none")
    parser.add_argument("--methods", default="knn,prototype,linear")
    parser.add_argument("--shots", default="1,5,10,all")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    weights = args.weights or default_weights(args.backbone)

    with tempfile.TemporaryDirectory() as cache_dir:
        base = ExperimentConfig(
            dataset=args.dataset,
            data_root=args.data_root,
            backbone=args.backbone,
            weights=weights,
            resize="bilinear",
            cache_dir=cache_dir,
        )
        start = time.perf_counter()
        prepare_features(base, progress=False)
        extraction_s = time.perf_counter() - start

        runs = list(
            itertools.product(args.methods.split(","), args.shots.split(","), range(args.seeds))
        )
        fit_s = 0.0
        start = time.perf_counter()
        for method, shots, seed in runs:
            cfg = ExperimentConfig(
                **{**base.__dict__, "method": method, "shots": shots, "seed": seed}
            )
            bundle = prepare_features(cfg, progress=False)  # reads the cache
            assert all(bundle.cache_hits.values())
            t0 = time.perf_counter()
            run_on_features(cfg, bundle)
            fit_s += time.perf_counter() - t0
        cached_sweep_s = time.perf_counter() - start

    uncached_sweep_s = len(runs) * extraction_s + fit_s
    write_result(
        "cache",
        {
            "dataset": args.dataset,
            "backbone": args.backbone,
            "weights": weights,
            "runs": len(runs),
            "one_extraction_s": extraction_s,
            "cached_sweep_s": cached_sweep_s,
            "fit_and_evaluate_s": fit_s,
            "uncached_sweep_s_estimated": uncached_sweep_s,
            "speedup_cached_vs_uncached": uncached_sweep_s / cached_sweep_s,
            "cached_sweep_vs_one_extraction": cached_sweep_s / extraction_s,
            "target_speedup": 20.0,
        },
    )


if __name__ == "__main__":
    main()
