"""The cached few-shot sweep against one feature extraction, side by side in one run.

Targets: the 36-run cached sweep (3 methods x 4 shot budgets x 3 seeds on breastmnist) at most
0.25x the time of one extraction, and at least 20x faster than the same sweep re-extracting
features for every run.

- one extraction: every split of the dataset embedded into an empty feature cache (with the
  precision check), as the first run of a sweep does.
- cached sweep: the runs as ``clinadapt bench`` does them once the cache is full: the features
  read once, then every run's support sampling, fit, test predictions, metrics, bootstrap
  intervals, calibration block and record.
- bench grid: the same 36 runs through ``run_grid`` (what ``clinadapt bench`` calls), which also
  writes each record and each run's reliability diagram.
- uncached: --uncached-runs runs of the sweep, each in a fresh, empty cache folder so that it
  extracts every split again; the uncached sweep is their mean times the number of runs.
- the per-C probe of before the linear probe ran on one BLAS thread (a scikit-learn fit per C
  from zero, BLAS threads as the machine sets them, selection by roc_auc_score) refitted on every
  linear run's support set: its fit time beside the probe's, and the largest difference in C,
  test probabilities and test metrics (target: same C, metrics within 1e-6).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from _common import command, default_data_root, default_weights, machine, write_result
from clinadapt.adapt import create_method
from clinadapt.eval import bootstrap_ci, evaluate
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.common import sample_support, sample_validation
from clinadapt.runner.experiment import (
    ExperimentConfig,
    FeatureBundle,
    prepare_features,
    run_on_features,
)

METRICS = ("auc", "acc", "balanced_accuracy", "macro_f1", "ece")


def per_c_probe(x, y, xv, yv, xq, grid) -> tuple[float, np.ndarray]:
    """The single-label probe as it was fitted before: a scikit-learn fit per C from zero under
    the machine's BLAS threads, the best validation roc_auc_score kept (ties: smaller C), on
    the features as float64 like the probe's input checks make them."""
    x, xv, xq = (a.astype(np.float64) for a in (x, xv, xq))
    scaler = StandardScaler().fit(x)
    fits, scores = [], []
    for c in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=c, max_iter=1000, random_state=0)
            fits.append(model.fit(scaler.transform(x), y))
        p = fits[-1].predict_proba(scaler.transform(xv))
        if p.shape[1] == 2:
            scores.append(roc_auc_score(yv, p[:, 1]))
        else:
            scores.append(np.mean([roc_auc_score(yv == k, p[:, k]) for k in range(p.shape[1])]))
    best = int(np.argmax(scores))
    return grid[best], fits[best].predict_proba(scaler.transform(xq))


def compare_probes(cfgs: list[ExperimentConfig], bundle: FeatureBundle) -> dict[str, Any]:
    """Today's probe against the per-C probe of before on every linear run of the sweep."""
    info, feats, labels = bundle.info, bundle.features, bundle.labels
    test_y = labels["test"]
    new_s = old_s = 0.0
    worst = {"probability": 0.0, "metric": 0.0, "ci95": 0.0}
    same_c = True
    for cfg in cfgs:
        support, _ = sample_support(cfg, info, labels["train"])
        picked = sample_validation(cfg, info, labels["val"])
        x, y = feats["train"][support], labels["train"][support]
        xv, yv = feats["val"][picked], labels["val"][picked]
        start = time.perf_counter()
        probe = create_method("linear").fit(x, y, info.task, info.num_classes, val=(xv, yv))
        new_s += time.perf_counter() - start
        grid = probe.config.c_grid
        start = time.perf_counter()
        c, old_p = per_c_probe(x, y[:, 0], xv, yv[:, 0], feats["test"], grid)
        old_s += time.perf_counter() - start
        new_p = probe.predict_proba(feats["test"])
        same_c &= c == probe.selected()["C"]
        worst["probability"] = max(worst["probability"], float(np.abs(new_p - old_p).max()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old_m, new_m = evaluate(test_y, old_p, info.task), evaluate(test_y, new_p, info.task)
        for m in METRICS:
            worst["metric"] = max(worst["metric"], abs(new_m[m] - old_m[m]))
        old_ci = bootstrap_ci(test_y, old_p, info.task, seed=cfg.seed)
        new_ci = bootstrap_ci(test_y, new_p, info.task, seed=cfg.seed)
        diff = max(abs(a - b) for m in old_ci for a, b in zip(old_ci[m], new_ci[m], strict=True))
        worst["ci95"] = max(worst["ci95"], diff)
    return {
        "runs": len(cfgs),
        "probe_fit_s": new_s,
        "per_c_probe_of_before_fit_s": old_s,
        "speedup": old_s / new_s,
        "same_selected_c": bool(same_c),
        "max_abs_difference": worst,
        "target": "same C; test metrics and intervals within 1e-6",
    }


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
        "--uncached-runs", type=int, default=2, help="sweep runs measured without the cache"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights or default_weights(args.backbone)
    methods, shots = args.methods.split(","), args.shots.split(",")
    runs = list(itertools.product(methods, shots, range(args.seeds)))
    # the uncached sample spreads over the sweep: first, last and evenly in between
    step = max(1, (len(runs) - 1) // max(1, args.uncached_runs - 1))
    uncached_sample = runs[::step][: args.uncached_runs]
    base = {"data_root": args.data_root, "resize": "bilinear"}

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "sweep")

        def config(method: str, shot: str, seed: int, cache_dir: str) -> ExperimentConfig:
            return ExperimentConfig(
                dataset=args.dataset,
                backbone=args.backbone,
                weights=weights,
                method=method,
                shots=shot,
                seed=seed,
                cache_dir=cache_dir,
                **base,
            )

        cfgs = [config(*run, cache) for run in runs]
        start = time.perf_counter()
        bundle = prepare_features(cfgs[0], progress=False)
        extraction_s = time.perf_counter() - start
        assert not any(bundle.cache_hits.values()), "the extraction read a cache"

        start = time.perf_counter()
        bundle = prepare_features(cfgs[0], progress=False)
        read_s = time.perf_counter() - start
        assert all(bundle.cache_hits.values()), "the cached sweep re-extracted features"
        per_method = dict.fromkeys(methods, 0.0)
        for cfg in cfgs:
            start = time.perf_counter()
            run_on_features(cfg, bundle)
            per_method[cfg.method] += time.perf_counter() - start
        cached_sweep_s = read_s + sum(per_method.values())

        grid = GridConfig(
            datasets=[args.dataset],
            backbones=[args.backbone],
            weights=[weights],
            methods=methods,
            shots=shots,
            seeds=args.seeds,
            base={**base, "cache_dir": cache},
        )
        start = time.perf_counter()
        counts = run_grid(grid, Path(tmp) / "grid", progress=False)
        grid_s = time.perf_counter() - start
        assert counts["done"] == len(runs), counts

        linear = [cfg for cfg in cfgs if cfg.method == "linear"]
        probes = (
            compare_probes(linear, bundle) if linear and bundle.info.task.single_label else None
        )

        uncached = []
        for i, run in enumerate(uncached_sample):
            cfg = config(*run, str(Path(tmp) / f"fresh-{i}"))
            start = time.perf_counter()
            fresh = prepare_features(cfg, progress=False)
            run_on_features(cfg, fresh)
            uncached.append(time.perf_counter() - start)
            assert not any(fresh.cache_hits.values()), "an uncached run read the cache"
    precision = bundle.preprocessing["precision"]
    uncached_run_s = sum(uncached) / len(uncached)
    uncached_sweep_s = uncached_run_s * len(runs)
    write_result(
        "cache",
        {
            "command": command(),
            "machine": machine(),
            "dataset": args.dataset,
            "backbone": args.backbone,
            "weights": weights,
            "precision": precision,
            "runs": len(runs),
            "one_extraction_s": extraction_s,
            "cached_sweep_s": cached_sweep_s,
            "cached_sweep_parts_s": {"read_features": read_s, **per_method},
            "cached_sweep_vs_one_extraction": cached_sweep_s / extraction_s,
            "target_cached_sweep_vs_one_extraction": 0.25,
            "bench_grid_s": grid_s,
            "bench_grid_vs_one_extraction": grid_s / extraction_s,
            "bench_grid_note": (
                "run_grid, as clinadapt bench: the cached sweep plus one record and one "
                "reliability diagram (matplotlib PNG) written per run"
            ),
            "linear_probe_vs_per_c_probe_of_before": probes,
            "uncached_runs_measured": [
                {"method": m, "shots": k, "seed": s, "seconds": t}
                for (m, k, s), t in zip(uncached_sample, uncached, strict=True)
            ],
            "uncached_run_s_mean": uncached_run_s,
            "uncached_sweep_s": uncached_sweep_s,
            "speedup_cached_vs_uncached": uncached_sweep_s / cached_sweep_s,
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
