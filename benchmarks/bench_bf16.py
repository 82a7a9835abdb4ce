"""bf16 autocast against fp32 on real MedMNIST images, and what ``precision=auto`` decides.

For every shipped classification backbone in the weights folder (default ../shared/weights; a
folder whose config.json names a registered backbone: the MobileNets, not LiteMedSAM) and the
random-init control, on the first --n test images of BreastMNIST (all 156), PneumoniaMNIST and
RetinaMNIST at 28 px and on --volumes AdrenalMNIST3D volumes (axial slices through the 2D
backbone):

- per-image cosine between bf16 and fp32 features (mean, 1st percentile, min);
- wall time of both extractions in this run, and their ratio bf16 / fp32;
- linear-probe test AUC / ACC on BreastMNIST from fp32 features and from bf16 features;
- the decision of ``auto`` on each dataset's first training batch (what a run would use).

Prints a message and writes nothing when the data or weights folder is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import SHARED, cpu_name, default_data_root, write_result
from clinadapt.adapt import create_method
from clinadapt.backbones import BACKBONES, create_backbone
from clinadapt.data import load_dataset
from clinadapt.engine import (
    AUTO_MIN_COSINE,
    bf16_supported,
    extract_features,
    extraction_precision,
)
from clinadapt.engine.precision import row_cosine
from clinadapt.eval import evaluate
from clinadapt.runner.experiment import ExperimentConfig, make_preprocess

DATASETS_2D = ("breastmnist", "pneumoniamnist", "retinamnist")
DATASET_3D = "adrenalmnist3d"
PROBE_DATASET = "breastmnist"


def classification_weights(root: Path) -> list[tuple[str, str]]:
    """(backbone name, weights folder) for every shipped folder of a registered backbone."""
    found = []
    for config in sorted(root.glob("*/config.json")):
        arch = json.loads(config.read_text()).get("architecture")
        if arch in BACKBONES and (config.parent / "model.safetensors").exists():
            found.append((arch, str(config.parent)))
    return found


class Extractor:
    """One backbone's features in both precisions, timed, on the same images."""

    def __init__(self, backbone_name: str, weights: str, batch_size: int) -> None:
        self.backbone = create_backbone(backbone_name, weights)
        cfg = ExperimentConfig(backbone=backbone_name, weights=weights, resize="bilinear")
        self.preprocess = make_preprocess(self.backbone, cfg)
        self.batch_size = batch_size

    def features(self, images: Any, precision: str, is_volume: bool) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        out = extract_features(
            self.backbone,
            images,
            self.preprocess,
            batch_size=self.batch_size,
            precision=precision,
            is_volume=is_volume,
            device="cpu",
            progress=False,
        )
        return out, time.perf_counter() - start

    def warm_up(self, images: np.ndarray) -> None:
        """oneDNN builds its kernels on first use: keep that out of the timings."""
        for precision in ("fp32", "bf16"):
            self.features(images[: self.batch_size], precision, is_volume=False)

    def compare(self, images: Any, is_volume: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fp32, fp32_s = self.features(images, "fp32", is_volume)
        bf16, bf16_s = self.features(images, "bf16", is_volume)
        cos = row_cosine(fp32, bf16)
        summary = {
            "n": len(images),
            "cosine_mean": float(cos.mean()),
            "cosine_p01": float(np.percentile(cos, 1)),
            "cosine_min": float(cos.min()),
            "share_below_threshold": float((cos < AUTO_MIN_COSINE).mean()),
            "fp32_s": fp32_s,
            "bf16_s": bf16_s,
            "time_ratio_bf16_over_fp32": bf16_s / fp32_s,
        }
        return summary, {"fp32": fp32, "bf16": bf16}

    def auto(self, train_images: Any, is_volume: bool) -> dict[str, Any]:
        """What a run with precision=auto decides: its probe is the first training batch."""
        decision = extraction_precision(
            self.backbone,
            train_images,
            self.preprocess,
            batch_size=self.batch_size,
            is_volume=is_volume,
            device="cpu",
        )
        return decision.to_dict()


def linear_probe(dataset: Any, features: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Test AUC / ACC of the linear probe (all labels, C chosen on validation) fitted and
    evaluated per precision; ``fp32_probe_on_bf16_test`` applies the fp32-fitted probe to bf16
    test features, which separates the features moving from the fit landing elsewhere."""
    info, out, fitted = dataset.info, {}, {}
    test_y = dataset["test"].labels
    for precision in ("fp32", "bf16"):
        split = {name: f[precision] for name, f in features.items()}
        method = create_method("linear")
        val = (split["val"], dataset["val"].labels)
        method.fit(
            split["train"], dataset["train"].labels, info.task, info.num_classes, val=val, seed=0
        )
        metrics = evaluate(test_y, method.predict_proba(split["test"]), info.task)
        out[precision] = {"auc": metrics["auc"], "acc": metrics["acc"], "C": method.selected()["C"]}
        fitted[precision] = method
    cross = fitted["fp32"].predict_proba(features["test"]["bf16"])
    out["fp32_probe_on_bf16_test"] = {
        k: v for k, v in evaluate(test_y, cross, info.task).items() if k in ("auc", "acc")
    }
    out["auc_difference_bf16_minus_fp32"] = out["bf16"]["auc"] - out["fp32"]["auc"]
    out["acc_difference_bf16_minus_fp32"] = out["bf16"]["acc"] - out["fp32"]["acc"]
    return out


def measure(
    backbone_name: str, weights: str, datasets: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    ex = Extractor(backbone_name, weights, args.batch_size)
    ex.warm_up(np.asarray(datasets[PROBE_DATASET]["test"].images[: args.batch_size]))
    result: dict[str, Any] = {
        "backbone": backbone_name,
        "weights": Path(weights).name if weights != "none" else "none (random-init control)",
        "weights_id": ex.backbone.weights_id,
        "datasets": {},
    }
    for name, dataset in datasets.items():
        is_volume = dataset.info.ndim == 3
        limit = args.volumes if is_volume else args.n
        summary, test_features = ex.compare(np.asarray(dataset["test"].images[:limit]), is_volume)
        summary["auto"] = ex.auto(dataset["train"].images, is_volume)
        result["datasets"][name] = summary
        print(f"  {name}: cosine mean {summary['cosine_mean']:.4f} min {summary['cosine_min']:.4f}"
              f", auto -> {summary['auto']['used']}", flush=True)  # fmt: skip
        if name == PROBE_DATASET:
            features = {"test": test_features}
            for split in ("train", "val"):
                features[split] = ex.compare(np.asarray(dataset[split].images), False)[1]
            result[f"linear_probe_{name}"] = linear_probe(dataset, features)
    fp32_s = sum(d["fp32_s"] for d in result["datasets"].values())
    result["time_ratio_bf16_over_fp32"] = (
        sum(d["bf16_s"] for d in result["datasets"].values()) / fp32_s
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument(
        "--weights-root", default=os.environ.get("CLINADAPT_WEIGHTS") or str(SHARED / "weights")
    )
    parser.add_argument("--n", type=int, default=200, help="test images per 2D dataset")
    parser.add_argument("--volumes", type=int, default=4, help="3D test volumes (0: no 3D)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    args = parser.parse_args()
    weights_root = Path(args.weights_root)
    if args.data_root is None or not Path(args.data_root).is_dir() or not weights_root.is_dir():
        print(
            "bench_bf16: needs the MedMNIST files (--data-root or $CLINADAPT_DATA) and the shipped "
            f"weights (--weights-root or $CLINADAPT_WEIGHTS; looked in {weights_root}); skipped."
        )
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [*DATASETS_2D, *([DATASET_3D] if args.volumes else [])]
    datasets = {
        name: load_dataset(name, root=args.data_root, size=28, download=False) for name in names
    }
    models = [*classification_weights(weights_root), ("mobilenetv2_100", "none")]
    result: dict[str, Any] = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_native": bf16_supported(torch.device("cpu")),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "auto_min_cosine": AUTO_MIN_COSINE,
        "source_size": 28,
        "resize": "bilinear",
        "batch_size": args.batch_size,
        "note": (
            "times are wall clock in one process, fp32 then bf16 on the same images after a "
            "warm-up; cosine is per image between the two feature vectors; auto probes the "
            "first training batch of each dataset, as a run does"
        ),
        "models": [],
    }
    start = time.perf_counter()
    for backbone_name, weights in models:
        print(f"{backbone_name} {weights}", flush=True)
        result["models"].append(measure(backbone_name, weights, datasets, args))
    result["total_s"] = time.perf_counter() - start
    write_result("bf16", result)


if __name__ == "__main__":
    sys.exit(main())
