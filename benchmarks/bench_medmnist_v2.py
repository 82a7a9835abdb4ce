"""The MedMNIST v2 ResNet-18 (28) baselines reproduced, beside the published numbers.

Runs ``clinadapt reproduce medmnist-v2`` (the paper's recipe: from scratch, 100 epochs, batch
128, Adam 1e-3 decayed at epochs 50 and 75, model chosen on validation AUC) for each dataset
into ``OUT/<dataset>``, with ``--seeds`` seeds, then writes ``results/medmnist_v2.json``: test
AUC and ACC per seed, their mean and sd, the gap to the paper, the selected epoch, the time per
epoch and whether the data file matched the official release. Runs resume, so the command can
be stopped and started again; ``--summarise-only`` writes the JSON from the runs that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, default_data_root, machine, write_result


def run(dataset: str, out: Path, seeds: int, data_root: str) -> None:
    args = [sys.executable, "-m", "clinadapt", "reproduce", "medmnist-v2", "--datasets", dataset]
    args += ["--seeds", str(seeds), "--out", str(out), "--data-root", data_root, "--quiet"]
    subprocess.run(args, check=True, env={**os.environ})


def summarise(dataset: str, out: Path) -> dict[str, Any]:
    from clinadapt.runner.presets import MEDMNIST_V2_PUBLISHED

    records = [
        json.loads(p.read_text())
        for p in sorted(out.rglob("*.json"))
        if p.parent.name == "full" and p.parent.parent.parent.parent.name == dataset
    ]
    rows = []
    for rec in records:
        if rec["config"]["train"].get("epochs") != 100:
            continue
        history = rec["history"]
        rows.append(
            {
                "backbone": rec["config"]["backbone"],
                "seed": rec["config"]["seed"],
                "test_auc": rec["metrics"]["test"]["auc"],
                "test_acc": rec["metrics"]["test"]["acc"],
                "test_auc_ci95": rec["metrics"]["test_ci95"]["auc"],
                "val_auc_best": max(r["val_auc"] for r in history),
                "best_epoch": rec["method"]["selected"]["best_epoch"],
                "epochs": len(history),
                "time_per_epoch_s": rec["timings"]["time_per_epoch_s"],
                "train_throughput": rec["timings"].get("train_throughput"),
                "precision": rec["preprocessing"]["precision"],
                "torch_threads": rec["hardware"]["torch_threads"],
                "data_verified": rec["dataset"]["provenance"].get("verified"),
                "data_md5": rec["dataset"]["provenance"].get("md5"),
            }
        )
    summary: dict[str, Any] = {"runs": rows, "unfinished": unfinished(dataset, out)}
    for backbone in sorted({r["backbone"] for r in rows}):
        mine = [r for r in rows if r["backbone"] == backbone]
        published = MEDMNIST_V2_PUBLISHED[(dataset, backbone)]
        entry: dict[str, Any] = {"seeds": len(mine), "published": published}
        for metric in ("auc", "acc"):
            values = [r[f"test_{metric}"] for r in mine]
            mean = statistics.fmean(values)
            entry[metric] = {
                "mean": mean,
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "gap_to_published": mean - published[metric],
            }
        summary[backbone] = entry
    return summary


def unfinished(dataset: str, out: Path) -> list[dict[str, Any]]:
    """Runs with a checkpoint but no record yet: how far they got (they resume)."""
    rows = []
    for state_file in sorted(out.rglob("checkpoint/state.json")):
        run_dir = state_file.parent.parent
        if run_dir.with_suffix(".json").exists() or run_dir.parent.name != "full":
            continue
        state = json.loads(state_file.read_text())
        history = state["history"]
        rows.append(
            {
                "run": run_dir.name,
                "epochs_done": state["epoch"],
                "best_val_auc_so_far": max(r["val_auc"] for r in history) if history else None,
                "mean_epoch_s": statistics.fmean(r["seconds"] for r in history)
                if history
                else None,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the runs (OUT/<dataset>)")
    parser.add_argument("--datasets", default="pneumoniamnist,breastmnist")
    parser.add_argument("--seeds", default="1,3", help="seeds per dataset, in the same order")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) != len(datasets):
        raise SystemExit(f"--seeds needs one count per dataset ({len(datasets)}), got {seeds}")
    out = Path(args.out)
    data_root = default_data_root()
    if not args.summarise_only:
        if data_root is None:
            raise SystemExit("no MedMNIST folder: set CLINADAPT_DATA")
        for dataset, n in zip(datasets, seeds, strict=True):
            run(dataset, out / dataset, n, data_root)
    result = {
        "command": command(),
        "recipe": "MedMNIST v2 (Yang et al., Sci. Data 2023): ResNet-18 (28) from scratch, "
        "100 epochs, batch 128, Adam lr 1e-3 x0.1 at epochs 50 and 75, best validation AUC",
        "machine": machine(),
        "datasets": {d: summarise(d, out / d) for d in datasets},
    }
    write_result("medmnist_v2", result)


if __name__ == "__main__":
    main()
