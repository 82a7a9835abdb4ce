"""LiteMedSAM on real data: zero-shot with oracle prompts (box, point, box + point, and the box
itself as the mask) and adapted on a few labelled images (mask decoder, LoRA on the image
encoder's attention + decoder, full fine-tuning), beside the U-Net and frozen-head baselines of
``bench_segmentation.py`` (read from ``results/segmentation.json``).

Datasets: kvasir_seg (polyps), dsb2018_nuclei (one prompt per annotated nucleus) and
hippocampus_msd (3D MRI, slice by slice, prompts from each slice's truth, stacked back and scored
in 3D). Test cases are segmented at their own size and scored in their spacing (Dice, HD95,
NSD). Zero-shot prompts are deterministic (tight boxes, the most interior point), so one seed;
adapted rows sample their labelled cases per seed.

Every run is a ``clinadapt bench`` record under ``--out`` (resumable: a second call runs only
what is missing, so ``--seeds`` can grow between calls). The JSON lists per row the mean ± sd
over seeds, the seed-inclusive 95% interval, trainable parameters, training time, seconds per
test case and peak memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import RESULTS, SHARED, metric_summaries, write_result
from clinadapt.paths import cache_home
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.prompted_train import PROMPTED_TRAIN_DEFAULTS
from clinadapt.runner.records import read_records
from clinadapt.runner.report import build_report, summarise

DATASETS = ("kvasir_seg", "dsb2018_nuclei", "hippocampus_msd")
ZERO_SHOT = ("sam_box", "sam_point", "sam_box_point", "box_mask")
ADAPTED = ("sam_decoder", "sam_lora", "sam_full")
EPOCHS = {  # (dataset, shots) -> epochs of runs that train the encoder, sized to a 2-core CPU
    ("kvasir_seg", "10"): 5,
    ("kvasir_seg", "all"): 1,
    ("dsb2018_nuclei", "10"): 5,
    ("dsb2018_nuclei", "all"): 1,
    ("hippocampus_msd", "10"): 1,
    ("hippocampus_msd", "all"): 1,
}
DECODER_EPOCHS = 4
"""sam_decoder trains this many times the epochs: its frozen encoder's embeddings are computed
once, so its epochs cost a fraction of the others'."""
PER = {"dsb2018_nuclei": "instance"}
"""One prompt per annotated nucleus; elsewhere one per connected component of each class."""
METRICS = ("dice", "hd95", "nsd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=str(SHARED / "data"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "litemedsam"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(ZERO_SHOT + ADAPTED))
    parser.add_argument("--shots", default="10,all", help="labelled budgets of adapted methods")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of 10-shot adapted runs")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of this call's adapted runs (default: EPOCHS)",
    )
    parser.add_argument("--out", default=str(cache_home() / "bench_sam"))
    parser.add_argument(
        "--summarise-only", action="store_true", help="write the JSON and report, run nothing"
    )
    args = parser.parse_args()
    out = Path(args.out)
    datasets = args.datasets.split(",")
    methods = args.methods.split(",")
    for dataset in [] if args.summarise_only else datasets:
        for grid in grids(dataset, methods, args):
            counts = run_grid(grid, out, progress=False)
            print(dataset, grid.methods, grid.shots, counts, flush=True)
    records = read_records(out)
    build_report(out)
    rows = [_row(r, records) for r in summarise(records) if r["dataset"] in datasets]
    write_result(
        "sam",
        {
            "protocol": {
                "weights": args.weights,
                "zero_shot": "oracle prompts from each test case's ground truth: tight boxes, "
                "the most interior pixel as the point; one seed (nothing random)",
                "per": {d: PER.get(d, "component") for d in datasets},
                "adapted": {
                    "epochs": "per row (default: EPOCHS in the script; sam_decoder "
                    f"{DECODER_EPOCHS}x)",
                    "training": PROMPTED_TRAIN_DEFAULTS,
                    "prompts": "box per object of each training image, sides moved outward by "
                    "0-5 px (encoder frame), at most 16 objects per image",
                    "loss": "Dice + BCE per prompt (MedSAM); the best validation-Dice epoch is "
                    "kept, validation budget = shots",
                    "seeds": "10 labelled cases: as many as run (--seeds); all: 1",
                },
                "input": "longest side to 256 px, min-max per image, zero padding (LiteMedSAM)",
                "records": str(out),
            },
            "rows": rows,
            "baselines": _baselines(datasets),
            "failed": [r["error"] for r in records if r.get("failed")],
        },
    )


def grids(dataset: str, methods: list[str], args: argparse.Namespace) -> list[GridConfig]:
    """The zero-shot grid, then one adapted grid per budget."""
    base = {"data_root": args.data_root, "bootstrap": 1000}
    per = PER.get(dataset, "component")
    out = []
    zero = [m for m in methods if m in ZERO_SHOT]
    if zero:
        out.append(
            GridConfig(
                datasets=[dataset],
                backbones=["litemedsam"],
                weights=[args.weights],
                methods=zero,
                shots=["all"],  # ignored: zero-shot runs use no labelled image
                seeds=1,
                method_options={m: {"per": per} for m in zero},
                base=base,
            )
        )
    for method in [m for m in methods if m in ADAPTED]:
        for shots in args.shots.split(","):
            epochs = args.epochs or EPOCHS[(dataset, shots)]
            if method == "sam_decoder" and args.epochs is None:
                epochs *= DECODER_EPOCHS
            out.append(
                GridConfig(
                    datasets=[dataset],
                    backbones=["litemedsam"],
                    weights=[args.weights],
                    methods=[method],
                    shots=[shots],
                    seeds=args.seeds if shots != "all" else 1,
                    method_options={method: {"per": per}},
                    base={**base, "train": {"epochs": epochs}},
                )
            )
    return out


def _row(row: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: row[k] for k in ("dataset", "method", "shots", "seeds")}
    if row["method"] in ZERO_SHOT:
        out["shots"] = 0
    out.update(metric_summaries(row, METRICS))
    same = [
        r
        for r in records
        if not r.get("failed")
        and r["dataset"]["name"] == row["dataset"]
        and (r["config"]["method"], str(r["config"]["shots"])) == (row["method"], row["shots"])
    ]
    timings = [r["timings"] for r in same]
    out["trainable_parameters"] = row["fitted_parameters"]
    out["labelled_cases"] = row["labels_used"]
    out["train_s"] = _mean([t.get("train_s", 0.0) for t in timings])
    out["seconds_per_test_case"] = _mean([t["seconds_per_case"] for t in timings])
    out["embedding_cache"] = [r.get("embedding_cache") for r in same]
    out["peak_memory_mb"] = max(r["peak_memory_mb"] for r in same)
    if same and "train" in same[0]["method"]:
        out["epochs"] = same[0]["method"]["train"]["epochs"]
        out["best_epochs"] = [r["method"]["selected"]["best_epoch"] for r in same]
    out["prompts"] = same[0]["prompts"]["how"] if same else None
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _baselines(datasets: list[str]) -> list[dict[str, Any]]:
    """The rows of ``results/segmentation.json`` for the same datasets, as they were measured."""
    path = RESULTS / "segmentation.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())["rows"]
    return [r for r in rows if r["dataset"] in datasets]


if __name__ == "__main__":
    main()
