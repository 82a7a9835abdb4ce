"""Peak memory and speed of feature extraction and of the frozen few-shot sweep at 10k, 30k and
100k images, at 28 and 224 px: memory should not grow with the dataset beyond its features.

For each image size and dataset size N, a synthetic binary dataset (class-dependent blobs and
stripes plus noise; 70/10/20 train/val/test) is written a chunk at a time into a temporary folder
as an npz in MedMNIST's layout, the way a user brings a large dataset (``load_dataset(path)``
reads it memory-mapped). Two fresh processes then measure their peak resident memory
(``ru_maxrss``), one thread each:

- extraction: ``prepare_features`` as ``clinadapt run`` calls it: read the data, decide the
  precision, embed every split and write the feature cache. Speed in images/s and FLOP/s, the
  FLOPs per image counted with ``torch.utils.flop_counter.FlopCounterMode`` on one batch.
- sweep: ``run_grid`` as ``clinadapt bench`` calls it: knn, prototype and linear at 1, 10 and
  all shots, one seed, the features read from that cache, every record and reliability diagram
  written.

Unavoidable and reported beside the peaks: the (N, D) float32 features, and for the sweep the
float64 copy of the training features a method fits on at shots=all (twice their size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import peak_mb, rss_mb

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1}
METHODS = ["knn", "prototype", "linear"]
SHOTS = ["1", "10", "all"]


def split_sizes(n: int) -> dict[str, int]:
    train, val = (round(n * SPLIT_FRACTIONS[s]) for s in ("train", "val"))
    return {"train": train, "val": val, "test": n - train - val}


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ExperimentConfig options both workers share (the sweep's grid base)."""
    return {
        "input_size": args.input_size,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "cache_dir": args.cache,
    }


def extract_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from clinadapt.runner.experiment import ExperimentConfig, prepare_features

    torch.set_num_threads(1)
    before = rss_mb()
    cfg = ExperimentConfig(
        dataset=args.data, backbone=args.backbone, weights="none", **run_options(args)
    )
    bundle = prepare_features(cfg, progress=False)
    peak = peak_mb()
    seconds = sum(v for k, v in bundle.timings.items() if k.startswith("features_"))
    n = sum(len(y) for y in bundle.labels.values())
    return {
        "peak_rss_mb": round(peak, 1),
        "rss_after_imports_mb": round(before, 1),
        "features_mb": round(sum(f.nbytes for f in bundle.features.values()) / 2**20, 1),
        "train_features_mb": round(bundle.features["train"].nbytes / 2**20, 1),
        "feature_dim": int(bundle.features["train"].shape[1]),
        "extract_s": round(seconds, 2),
        "images_per_s": round(n / seconds, 1),
        "load_data_s": round(bundle.timings["load_data_s"], 2),
        "precision": bundle.preprocessing["precision"],
        "cache_hits": bundle.cache_hits,
    }


def sweep_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from clinadapt.runner.bench import GridConfig, run_grid

    torch.set_num_threads(1)
    before = rss_mb()
    records: list[dict[str, Any]] = []
    grid = GridConfig(
        datasets=[args.data],
        backbones=[args.backbone],
        weights=["none"],
        methods=METHODS,
        shots=SHOTS,
        seeds=1,
        base=run_options(args),
    )
    start = time.perf_counter()
    counts = run_grid(grid, args.runs, progress=False, on_record=records.append)
    seconds = time.perf_counter() - start
    peak = peak_mb()
    runs = [
        {
            "method": r["config"]["method"],
            "shots": r["config"]["shots"],
            "test_auc": round(r["metrics"]["test"]["auc"], 4),
            "fit_s": round(r["timings"]["fit_s"], 2),
            "predict_s": round(r["timings"]["predict_s"], 2),
            "run_s": round(r["timings"]["run_s"], 2),
        }
        for r in records
        if not r.get("failed")
    ]
    return {
        "peak_rss_mb": round(peak, 1),
        "rss_after_imports_mb": round(before, 1),
        "seconds": round(seconds, 1),
        "counts": counts,
        "all_features_from_cache": all(all(r["feature_cache_hits"].values()) for r in records),
        "runs": runs,
    }


def flops_per_image(backbone_name: str, edge: int, input_size: int, batch: int) -> float:
    """Forward FLOPs of one image, counted on one batch of synthetic images."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clinadapt.backbones import create_backbone
    from clinadapt.data import Preprocess

    backbone = create_backbone(backbone_name, "none").eval()
    cfg = backbone.pretrained_cfg
    preprocess = Preprocess(input_size, cfg.mean, cfg.std, "nearest")
    images = np.random.default_rng(0).integers(0, 256, (batch, edge, edge), dtype=np.uint8)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        backbone.embed(torch.as_tensor(preprocess(images)))
    return counter.get_total_flops() / batch


def worker_process(kind: str, args: argparse.Namespace, data: Path, work: Path) -> dict:
    """One measurement in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, __file__, f"--worker={kind}", f"--data={data}"]
    command += [f"--cache={work / 'cache'}", f"--runs={work / 'runs'}"]
    command += [f"--backbone={args.backbone}", f"--input-size={args.input_size}"]
    command += [f"--batch-size={args.batch_size}", f"--precision={args.precision}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLINADAPT_CACHE": str(work / "home")}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"{kind} worker for {data} failed:\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, edge: int, n: int, root: Path) -> dict[str, Any]:
    from clinadapt.data.synthetic import write_synthetic_npz

    work = root / f"{edge}px-{n}"
    sizes = split_sizes(n)
    start = time.perf_counter()
    data = write_synthetic_npz(
        work / f"synthetic{edge}_{n}.npz",
        n_train=sizes["train"],
        n_val=sizes["val"],
        n_test=sizes["test"],
        size=edge,
        seed=0,
        chunk=max(1, (1 << 22) // (edge * edge)),
    )
    written_s = time.perf_counter() - start
    extraction = worker_process("extract", args, data, work)
    sweep = worker_process("sweep", args, data, work)
    float64_copy = 2 * extraction["train_features_mb"]
    result = {
        "n_images": n,
        "splits": sizes,
        "dataset_uint8_mb": round(n * edge * edge / 2**20, 1),
        "write_dataset_s": round(written_s, 1),
        "features_mb": extraction["features_mb"],
        "train_features_float64_mb": float64_copy,
        "extraction": extraction,
        "sweep": sweep,
    }
    for name, part, extra in (("extraction", extraction, 0.0), ("sweep", sweep, float64_copy)):
        growth = part["peak_rss_mb"] - part["rss_after_imports_mb"]
        part["growth_mb"] = round(growth, 1)
        part["growth_beyond_features_mb"] = round(growth - extraction["features_mb"] - extra, 1)
        result[name] = part
    shutil.rmtree(work, ignore_errors=True)
    return result


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Largest N over smallest N, for the dataset, the features and each process's memory."""
    small, large = runs[0], runs[-1]

    def ratio(get) -> float:
        return round(get(large) / get(small), 3)

    return {
        "images": ratio(lambda r: r["n_images"]),
        "features": ratio(lambda r: r["features_mb"]),
        "extraction_peak_rss": ratio(lambda r: r["extraction"]["peak_rss_mb"]),
        "sweep_peak_rss": ratio(lambda r: r["sweep"]["peak_rss_mb"]),
        "extraction_peak_rss_less_features": ratio(
            lambda r: r["extraction"]["peak_rss_mb"] - r["features_mb"]
        ),
        "sweep_peak_rss_less_features_and_float64_copy": ratio(
            lambda r: r["sweep"]["peak_rss_mb"] - r["features_mb"] - r["train_features_float64_mb"]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,30000,100000", help="dataset sizes N")
    parser.add_argument("--edges", default="28,224", help="image sizes in pixels")
    parser.add_argument("--backbone-28", default="mobilenetv2_100", help="backbone at 28 px")
    parser.add_argument(
        "--backbone-224", default="timm:mobilenetv3_small_050", help="backbone at 224 px"
    )
    parser.add_argument(
        "--sizes-224", default=None, help="dataset sizes at 224 px (default: --sizes)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--workdir", default=None, help="temporary folder (default: system's)")
    parser.add_argument("--name", default="scale", help="results/<name>.json")
    for hidden in ("worker", "data", "cache", "runs", "backbone", "input-size"):
        parser.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        args.input_size = int(args.input_size)
        work = {"extract": extract_worker, "sweep": sweep_worker}[args.worker]
        print(json.dumps(work(args)))
        return

    from _common import command, machine, write_result

    begun = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-scale-") as tmp:
        for edge in (int(e) for e in args.edges.split(",")):
            args.backbone = getattr(args, f"backbone_{edge}", None) or args.backbone_224
            args.input_size = edge  # the images' own size: no resizing cost in the timing
            sizes = args.sizes_224 if edge == 224 and args.sizes_224 else args.sizes
            flops = flops_per_image(args.backbone, edge, args.input_size, args.batch_size)
            runs = [measure(args, edge, int(n), Path(tmp)) for n in sizes.split(",")]
            for run in runs:
                run["extraction"]["gflop_per_s"] = round(
                    flops * run["extraction"]["images_per_s"] / 1e9, 2
                )
            results[f"{edge}px"] = {
                "backbone": args.backbone,
                "weights": "none (random init, seeded)",
                "input_size": args.input_size,
                "mflop_per_image": round(flops / 1e6, 2),
                "runs": runs,
                "ratio_largest_over_smallest": ratios(runs),
            }
    result = {
        "command": command(),
        "machine": machine(),
        "batch_size": args.batch_size,
        "precision": args.precision,
        "methods": METHODS,
        "shots": SHOTS,
        "seeds": 1,
        "total_s": round(time.perf_counter() - begun, 1),
        **results,
    }
    write_result(args.name, result)


if __name__ == "__main__":
    main()
