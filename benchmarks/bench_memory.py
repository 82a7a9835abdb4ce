"""Peak memory of streaming feature extraction does not grow with the dataset.

Extracts features for N synthetic images (64 px by default, so that the 20k memmap is 80 MB
and loading it whole would show) read from a uint8 memmap, for N = 5k and 20k,
each in a fresh subprocess so ``ru_maxrss`` (the peak resident set) belongs to that size
alone. Target: peak(20k) / peak(5k) close to 1. The (N, D) float32 output is allocated up
front and is reported separately (it is small and is the result itself).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import peak_mb, rss_mb


def worker(args: argparse.Namespace) -> dict:
    """One size, measured inside this (fresh) process."""
    import torch

    from clinadapt.backbones import create_backbone
    from clinadapt.data import Preprocess
    from clinadapt.engine import extract_features

    torch.manual_seed(0)  # the same random-init weights in every worker

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.u8"
        rng = np.random.default_rng(0)
        with path.open("wb") as fh:  # written in chunks, never mapped or held whole here
            for start in range(0, args.worker, 4096):
                count = min(4096, args.worker - start)
                fh.write(
                    rng.integers(
                        0, 256, size=(count, args.edge, args.edge), dtype=np.uint8
                    ).tobytes()
                )
        images = np.memmap(
            path, dtype=np.uint8, mode="r", shape=(args.worker, args.edge, args.edge)
        )
        backbone = create_backbone(args.backbone, args.weights)
        cfg = backbone.pretrained_cfg
        preprocess = Preprocess(args.input_size or cfg.input_size, cfg.mean, cfg.std, "nearest")
        baseline_rss, baseline_peak = rss_mb(), peak_mb()
        start = time.perf_counter()
        feats = extract_features(
            backbone,
            images,
            preprocess,
            batch_size=args.batch_size,
            precision=args.precision,
            progress=False,
        )
        seconds = time.perf_counter() - start
        peak = peak_mb()
    return {
        "n_images": args.worker,
        "input_size": preprocess.input_size,
        "rss_before_extraction_mb": round(baseline_rss, 1),
        "peak_before_extraction_mb": round(baseline_peak, 1),
        "peak_rss_mb": round(peak, 1),
        "growth_during_extraction_mb": round(peak - baseline_peak, 1),
        "dataset_uint8_mb": round(images.nbytes / 2**20, 1),
        "features_mb": round(feats.nbytes / 2**20, 1),
        "seconds": round(seconds, 2),
        "images_per_s": round(args.worker / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--edge", type=int, default=64, help="synthetic image edge in pixels")
    parser.add_argument("--backbone", default="test_cnn")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--input-size", type=int, default=None, help="default: backbone's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--name", default="memory", help="results/<name>.json")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return

    from _common import write_result

    passed = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k in ("edge", "backbone", "weights", "input_size", "batch_size", "precision")
        and v is not None
    ]
    runs = []
    for n in (int(s) for s in args.sizes.split(",")):
        proc = subprocess.run(
            [sys.executable, __file__, f"--worker={n}", *passed],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            sys.exit(f"worker for {n} images failed:\n{proc.stderr}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    small, large = runs[0], runs[-1]
    result = {
        "image_edge": args.edge,
        "backbone": args.backbone,
        "weights": args.weights,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "runs": runs,
        "peak_ratio_largest_over_smallest": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "dataset_ratio": round(large["n_images"] / small["n_images"], 1),
    }
    write_result(args.name, result)


if __name__ == "__main__":
    main()
