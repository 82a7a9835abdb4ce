"""Few-shot sweep on cached features versus re-extracting features for every run, both measured.

Target: the cached sweep at least 20x faster than the same sweep re-extracting features. The
cached side runs the whole sweep (every run reads its features from the cache). The uncached
side runs --uncached-runs runs of that sweep in full, each in a fresh, empty cache folder so
that it extracts every split again, and reports their mean time per run; the uncached sweep
is that mean times the number of runs. Both sides are also given in units of one extraction.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from _common import default_data_root, default_weights, write_result
from clinadapt.runner.experiment import ExperimentConfig, prepare_features, run_on_features


def timed_run(cfg: ExperimentConfig) -> tuple[float, bool]:
    """Seconds for one run as a sweep does it (features, then fit and evaluate), and whether
    every split came from the cache."""
    start = time.perf_counter()
    bundle = prepare_features(cfg, progress=False)
    run_on_features(cfg, bundle)
    return time.perf_counter() - start, all(bundle.cache_hits.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", default=None, help="default: local weights, else none")
    parser.add_argument("--methods", default="knn,prototype,linear")
    parser.add_argument("--shots", default="1,5,10,all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--uncached-runs", type=int, default=3, help="sweep runs measured without the cache"
    )
    args = parser.parse_args()
    weights = args.weights or default_weights(args.backbone)
    runs = list(
        itertools.product(args.methods.split(","), args.shots.split(","), range(args.seeds))
    )
    # the uncached sample spreads over the sweep: first, last and evenly in between
    step = max(1, (len(runs) - 1) // max(1, args.uncached_runs - 1))
    uncached_sample = runs[::step][: args.uncached_runs]

    with tempfile.TemporaryDirectory() as tmp:

        def config(method: str, shots: str, seed: int, cache_dir: Path) -> ExperimentConfig:
            return ExperimentConfig(
                dataset=args.dataset,
                data_root=args.data_root,
                backbone=args.backbone,
                weights=weights,
                resize="bilinear",
                method=method,
                shots=shots,
                seed=seed,
                cache_dir=str(cache_dir),
            )

        start = time.perf_counter()
        bundle = prepare_features(config(*runs[0], Path(tmp) / "sweep"), progress=False)
        extraction_s = time.perf_counter() - start
        precision = bundle.preprocessing["precision"]

        cached = [timed_run(config(*run, Path(tmp) / "sweep")) for run in runs]
        assert all(hit for _, hit in cached), "the cached sweep re-extracted features"
        cached_sweep_s = sum(s for s, _ in cached)

        uncached = [
            timed_run(config(*run, Path(tmp) / f"fresh-{i}"))
            for i, run in enumerate(uncached_sample)
        ]
        assert not any(hit for _, hit in uncached), "an uncached run read the cache"
    uncached_run_s = sum(s for s, _ in uncached) / len(uncached)
    uncached_sweep_s = uncached_run_s * len(runs)
    write_result(
        "cache",
        {
            "dataset": args.dataset,
            "backbone": args.backbone,
            "weights": weights,
            "precision": precision,
            "runs": len(runs),
            "one_extraction_s": extraction_s,
            "cached_sweep_s": cached_sweep_s,
            "cached_run_s_mean": cached_sweep_s / len(runs),
            "uncached_runs_measured": [
                {"method": m, "shots": k, "seed": s, "seconds": t}
                for (m, k, s), (t, _) in zip(uncached_sample, uncached, strict=True)
            ],
            "uncached_run_s_mean": uncached_run_s,
            "uncached_sweep_s": uncached_sweep_s,
            "speedup_cached_vs_uncached": uncached_sweep_s / cached_sweep_s,
            "cached_sweep_vs_one_extraction": cached_sweep_s / extraction_s,
            "uncached_sweep_vs_one_extraction": uncached_sweep_s / extraction_s,
            "target_speedup": 20.0,
            "note": (
                "uncached_sweep_s is the measured mean of the uncached runs (each extracting "
                "every split into an empty cache) times the number of runs"
            ),
        },
    )


if __name__ == "__main__":
    main()
