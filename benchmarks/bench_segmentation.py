"""Segmentation baselines on real data: U-Net from scratch against a decoder head on a frozen
MobileNetV2, ImageNet weights and their random-init control, at 10 labelled cases and at all.

Datasets (under ``--data-root`` or beside it): kvasir_seg (2D RGB polyps), dsb2018_nuclei (2D
nuclei, instance masks united) and hippocampus_msd (3D MRI, anterior and posterior
hippocampus). 2D cases reach every network at ``--size`` px (bilinear; masks nearest);
volumes reach the 3D U-Net zero-padded into a 64^3 cube (no resampling) and the 2D MobileNetV2
as axial slices at 64 px (near their own size), stacked back into a volume. Test cases are
scored at their own size and spacing (Dice, HD95, NSD; ``clinadapt.tasks.segmentation``).

Training is sized to a 2-core CPU: the epochs per dataset and budget are in ``EPOCHS`` and in the
result; every run is a ``clinadapt bench`` record (resumable: a second call only runs what is
missing, so ``--seeds`` can grow between calls). The JSON lists, per row, the mean ± sd over
seeds, the seed-inclusive 95% interval of one run, undefined cases, trainable parameters, run
time and peak memory; the HTML report beside the records shows best/median/worst overlays.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _common import default_data_root, default_weights, metric_summaries, write_result
from clinadapt.config import to_dict
from clinadapt.engine.train_config import TrainConfig
from clinadapt.paths import cache_home
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.records import read_records
from clinadapt.runner.report import build_report, summarise

DATASETS = ("dsb2018_nuclei", "hippocampus_msd", "kvasir_seg")
EPOCHS = {  # (dataset, shots) -> epochs
    ("kvasir_seg", "10"): 30,
    ("kvasir_seg", "all"): 4,
    ("dsb2018_nuclei", "10"): 30,
    ("dsb2018_nuclei", "all"): 10,
    ("hippocampus_msd", "10"): 20,
    ("hippocampus_msd", "all"): 1,
}
METRICS = ("dice", "hd95", "nsd")


def models(dataset: str, weights: str) -> dict[str, dict[str, Any]]:
    """The compared models: backbone, weights, method and their input options."""
    volume = dataset == "hippocampus_msd"
    unet = {"backbone": "unet3d", "weights": "none", "method": "full"}
    unet["base"] = {"resize": "pad", "input_size": 64, "batch_size": 2} if volume else {}
    head = {"backbone": "mobilenetv2_100", "method": "head", "base": {}}
    if volume:  # axial slices are about 50 x 35 voxels: 64 px keeps them near their own size
        head["base"] = {"input_size": 64}
    return {
        "unet (scratch)": unet if volume else {**unet, "backbone": "unet"},
        "mobilenetv2 head, ImageNet (frozen)": {**head, "weights": weights},
        "mobilenetv2 head, random init (frozen)": {**head, "weights": "none"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--shots", default="10,all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="2D input size (px)")
    parser.add_argument("--out", default=str(cache_home() / "bench_segmentation"))
    parser.add_argument(
        "--models", default="", help="run only models whose name contains one of these (a,b)"
    )
    parser.add_argument(
        "--summarise-only", action="store_true", help="write the JSON and report, run nothing"
    )
    args = parser.parse_args()
    weights = default_weights("mobilenetv2_100")
    out = Path(args.out)
    for dataset in [] if args.summarise_only else args.datasets.split(","):
        for shots in args.shots.split(","):
            for name, spec in models(dataset, weights).items():
                wanted = [m for m in args.models.split(",") if m]
                if wanted and not any(m in name for m in wanted):
                    continue
                train = {"epochs": EPOCHS[(dataset, shots)], "batch_size": 8}
                base = {"data_root": args.data_root, "input_size": args.size, "bootstrap": 1000}
                base.update(spec["base"])
                train["batch_size"] = base.pop("batch_size", train["batch_size"])
                grid = GridConfig(
                    datasets=[dataset],
                    backbones=[spec["backbone"]],
                    weights=[spec["weights"]],
                    methods=[spec["method"]],
                    shots=[shots],
                    seeds=args.seeds,
                    base={**base, "train": train},
                )
                counts = run_grid(grid, out, progress=False)
                print(dataset, shots, spec["backbone"], spec["weights"], counts, flush=True)
    records = read_records(out)
    rows = summarise(records)
    build_report(out)
    write_result(
        "segmentation",
        {
            "protocol": {
                "epochs": {f"{d}/{s}": e for (d, s), e in EPOCHS.items()},
                "input": f"2D: {args.size} px bilinear (masks nearest); hippocampus: unet3d "
                "zero-padded into 64^3, mobilenetv2 axial slices at 64 px",
                "training": {
                    k: v
                    for k, v in to_dict(TrainConfig()).items()
                    if k in ("optimizer", "lr", "weight_decay", "schedule", "augment")
                },
                "loss": "Dice + cross-entropy; the best validation-Dice epoch is kept",
                "weights": weights,
                "seeds": "per row (seeds 0, 1, ... as far as run)",
                "records": str(out),
            },
            "rows": [_row(r, records) for r in rows if r["dataset"] in args.datasets.split(",")],
            "failed": [r["error"] for r in records if r.get("failed")],
        },
    )


def _row(row: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {
        k: row[k]
        for k in ("dataset", "backbone", "weights", "pretrained", "method", "shots", "seeds")
    }
    out.update(metric_summaries(row, METRICS))
    out["trainable_parameters"] = row["fitted_parameters"]
    out["labelled_cases"] = row["labels_used"]
    out["run_time_s"] = row["time_s"]
    same = [
        r
        for r in records
        if not r.get("failed")
        and (r["dataset"]["name"], r["config"]["backbone"], r["config"]["weights"])
        == (row["dataset"], row["backbone"], row["weights"])
        and (r["config"]["method"], str(r["config"]["shots"])) == (row["method"], row["shots"])
    ]
    out["peak_memory_mb"] = max(r["peak_memory_mb"] for r in same)
    out["epochs"] = same[0]["method"]["train"]["epochs"]
    out["protocol"] = row["protocol"]
    return out


if __name__ == "__main__":
    main()
