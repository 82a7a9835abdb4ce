"""3D volumes through a 2D backbone: each distinct slice of a batch embedded once, against the
path of before (every slice embedded), side by side in one run on the same volumes.

Target: at least 2x faster per volume with the same features (cosine > 0.9999 per volume).
Settings as the issue measured them: all slices at the backbone's 224 px, and 8 slices at
112 px; axial slices of MedMNIST's adrenalmnist3d (28^3 organ masks, shapes in empty space).
Each setting runs the two paths alternately, twice, and keeps each path's faster pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from _common import command, default_data_root, default_weights, machine, write_result
from clinadapt.backbones import create_backbone
from clinadapt.data import Preprocess
from clinadapt.engine import extract_features
from clinadapt.engine import features as features_module
from clinadapt.engine.features import PLANE_AXES, unique_slices


def every_slice(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The path of before: no slice is shared."""
    return slices, np.arange(len(slices))


def measure(
    backbone, volumes: np.ndarray, preprocess: Preprocess, max_slices: int | None, args
) -> dict:
    """Both paths on the same volumes, alternately, twice; each path's faster pass counts."""

    def embed(vols: np.ndarray) -> np.ndarray:
        return extract_features(
            backbone,
            vols,
            preprocess,
            batch_size=args.batch_size,
            precision="fp32",
            volume_mode=args.mode,
            max_slices=max_slices,
            is_volume=True,
            progress=False,
        )

    counts = []

    def counted(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distinct, inverse = unique_slices(slices)
        counts.append((len(slices), len(distinct)))
        return distinct, inverse

    embed(volumes[:2])  # warm-up
    seconds: dict[str, list[float]] = {"every_slice": [], "distinct_slices": []}
    out = {}
    for _ in range(2):
        for name, rule in (("every_slice", every_slice), ("distinct_slices", counted)):
            counts.clear()
            with mock.patch.object(features_module, "unique_slices", rule):
                start = time.perf_counter()
                out[name] = embed(volumes)
                seconds[name].append(time.perf_counter() - start)
    a, b = out["every_slice"], out["distinct_slices"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    total, distinct = np.sum(counts, axis=0)
    old, new = min(seconds["every_slice"]), min(seconds["distinct_slices"])
    return {
        "input_size": preprocess.input_size,
        "max_slices": max_slices,
        "slices_per_volume": int(total) // len(volumes),
        "slices_embedded_fraction": float(distinct / total),
        "every_slice_s_per_volume": old / len(volumes),
        "distinct_slices_s_per_volume": new / len(volumes),
        "speedup": old / new,
        "passes_s": seconds,
        "min_cosine": float(cosine.min()),
        "max_abs_difference": float(np.abs(a - b).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="adrenalmnist3d", help="a MedMNIST 3D .npz name")
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--volumes", type=int, default=16, help="test volumes embedded")
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", default=None, help="default: local weights, else none")
    parser.add_argument("--mode", default="axial", choices=list(PLANE_AXES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights or default_weights(args.backbone)
    source = Path(args.data_root or ".") / f"{args.dataset}.npz"
    if not source.is_file():
        sys.exit(f"{source} not found: pass --data-root, the folder with MedMNIST's .npz files")
    volumes = np.load(source)["test_images"][: args.volumes]
    backbone = create_backbone(args.backbone, weights)
    cfg = backbone.pretrained_cfg
    settings = [
        measure(backbone, volumes, Preprocess(size, cfg.mean, cfg.std, "bilinear"), slices, args)
        for size, slices in ((cfg.input_size, None), (112, 8))
    ]
    write_result(
        "volumes",
        {
            "command": command(),
            "machine": machine(),
            "dataset": args.dataset,
            "split": "test",
            "volumes": len(volumes),
            "volume_shape": list(volumes.shape[1:]),
            "backbone": args.backbone,
            "weights": weights,
            "mode": args.mode,
            "batch_size": args.batch_size,
            "precision": "fp32",
            "settings": settings,
            "target": "speedup >= 2 with min_cosine > 0.9999",
        },
    )


if __name__ == "__main__":
    main()
