"""Does self-supervised pretraining on unlabelled medical images help, and which method?

Pretraining pool: the training splits of pneumoniamnist, breastmnist and retinamnist (28 px,
labels ignored). Runs, each with a CPU-sized epoch budget (``--epochs NAME=N`` changes one):

- ``simclr``, ``dino``, ``mae``: ``vit_t_28`` (a 6-block ViT for 28 px, patch 4) from scratch,
  against the same architecture's random initialisation (``none``);
- ``continued``: SimCLR continued from the ImageNet MobileNetV2 in ``../shared/weights``
  (at 112 px), against that model unchanged; ``continued_lora`` the same through LoRA (rank 8
  on the pointwise convolutions, merged into the weights afterwards);
- ``mae3d``: MAE of ``vit3d_t_28`` on adrenalmnist3d volumes, against random initialisation.

Each backbone is then scored with ``knn`` and ``linear`` at 10 shots and all labels, 3 seeds,
on each dataset's test split, through ``clinadapt bench``. Pretraining runs and grid runs are
resumable (finished ones are skipped), so the script can be stopped and started again.
Writes ``results/pretrain.json``: the table (mean and sd over seeds) and each pretraining run's
epochs, minutes, loss and online k-NN curve.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from _common import default_data_root, default_weights, write_result

POOL = "pneumoniamnist,breastmnist,retinamnist"
SCRATCH = {"backbone": "vit_t_28", "weights": "none", "batch_size": 128, "lr": 1e-3}
CONTINUED = {
    "data": POOL,
    "backbone": "mobilenetv2_100",
    "method": "simclr",
    "epochs": 3,
    "batch_size": 64,
    "lr": 1e-4,
    "input_size": 112,
}
RUNS: dict[str, dict[str, Any]] = {
    "simclr": {**SCRATCH, "data": POOL, "method": "simclr", "epochs": 15},
    "dino": {**SCRATCH, "data": POOL, "method": "dino", "epochs": 8},
    "mae": {**SCRATCH, "data": POOL, "method": "mae", "epochs": 30},
    "continued": CONTINUED,
    "continued_lora": {**CONTINUED, "lora_rank": 8, "lr": 1e-3},
    "mae3d": {
        "data": "adrenalmnist3d",
        "backbone": "vit3d_t_28",
        "weights": "none",
        "method": "mae",
        "epochs": 40,
        "batch_size": 64,
        "lr": 1e-3,
    },
}
DATASETS_2D = ["pneumoniamnist", "breastmnist", "retinamnist"]


def pretrain(name: str, options: dict[str, Any], out: Path, data_root: str | None) -> Path:
    from clinadapt.config import from_dict
    from clinadapt.runner.pretrain import BACKBONE_DIR, run_pretrain
    from clinadapt.runner.records import write_json_atomic
    from clinadapt.ssl.config import PretrainConfig

    run_dir = out / "pretrain" / name
    if not (run_dir / "record.json").exists():
        cfg = from_dict(PretrainConfig, {**options, "data_root": data_root, "resume": True})
        write_json_atomic(run_dir / "record.json", run_pretrain(cfg, run_dir))
    return run_dir / BACKBONE_DIR


def evaluate(
    datasets: list[str], backbone: str, weights: list[str], out: Path, base: dict[str, Any]
) -> None:
    from clinadapt.runner.bench import GridConfig, run_grid

    grid = GridConfig(
        datasets=datasets,
        backbones=[backbone],
        weights=weights,
        methods=["knn", "linear"],
        shots=["10", "all"],
        seeds=3,
        base={"bootstrap": 0, **base},
    )
    run_grid(grid, out / "eval")


def summarise(out: Path, labels: dict[str, str]) -> list[dict[str, Any]]:
    from clinadapt.runner.records import read_records

    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in read_records(out / "eval"):
        if "error" in r or "metrics" not in r:
            continue
        c = r["config"]
        key = (c["dataset"], c["backbone"], labels.get(c["weights"], c["weights"]), c["method"])
        groups[(*key, str(c["shots"]))].append(r["metrics"]["test"])
    rows = []
    for (dataset, backbone, weights, method, shots), runs in sorted(groups.items()):
        auc = np.array([m["auc"] for m in runs])
        acc = np.array([m["acc"] for m in runs])
        rows.append(
            {
                "dataset": dataset,
                "backbone": backbone,
                "weights": weights,
                "method": method,
                "shots": shots,
                "seeds": len(runs),
                "auc_mean": float(auc.mean()),
                "auc_sd": float(auc.std(ddof=1)) if len(auc) > 1 else 0.0,
                "acc_mean": float(acc.mean()),
                "acc_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            }
        )
    return rows


def pretraining_summary(out: Path, name: str) -> dict[str, Any]:
    record = json.loads((out / "pretrain" / name / "record.json").read_text())
    history = record["history"]
    return {
        "config": {k: record["config"][k] for k in ("data", "backbone", "weights", "method")},
        "epochs": len(history),
        "minutes": sum(h["seconds"] for h in history) / 60,  # over resumed sessions too
        "train_images": record["train_images"],
        "trainable_parameters": record["method"]["trainable_parameters"],
        "trainable_percent_of_backbone": record["method"]["trainable_percent_of_backbone"],
        "loss": [round(h["loss"], 4) for h in history],
        "knn_val_auc": [round(h["knn_auc"], 4) for h in history if h.get("knn_auc") is not None],
        "monitor": record["monitor"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-pretrain", help="working folder")
    parser.add_argument("--only", default=",".join(RUNS), help="pretraining runs to do")
    parser.add_argument("--epochs", nargs="*", default=[], help="NAME=EPOCHS overrides")
    args = parser.parse_args()
    out, data_root = Path(args.out), default_data_root()
    if data_root is None:
        raise SystemExit("needs the MedMNIST files: set CLINADAPT_DATA or provide ../shared/data")
    imagenet = default_weights("mobilenetv2_100")
    runs = {k: dict(v) for k, v in RUNS.items() if k in args.only.split(",")}
    for item in args.epochs:
        name, epochs = item.split("=")
        runs[name]["epochs"] = int(epochs)
    for name in ("continued", "continued_lora"):
        if name in runs:
            if imagenet == "none":
                raise SystemExit("continued pretraining needs ../shared/weights (MobileNetV2)")
            runs[name]["weights"] = imagenet
    made = {name: str(pretrain(name, options, out, data_root)) for name, options in runs.items()}
    labels = {path: name for name, path in made.items()}
    labels.update({"none": "random init", imagenet: "ImageNet (unchanged)"})
    base = {"data_root": data_root, "resize": "bilinear"}  # as pretraining saw the images
    scratch = [made[n] for n in ("simclr", "dino", "mae") if n in made]
    if scratch:
        evaluate(DATASETS_2D, "vit_t_28", ["none", *scratch], out, base)
    continued = [made[n] for n in ("continued", "continued_lora") if n in made]
    if continued:
        weights = [imagenet, *continued]
        evaluate(DATASETS_2D, "mobilenetv2_100", weights, out, {**base, "input_size": 112})
    if "mae3d" in made:
        evaluate(["adrenalmnist3d"], "vit3d_t_28", ["none", made["mae3d"]], out, base)
    write_result(
        "pretrain",
        {
            "protocol": "pretraining on the pooled training splits (labels ignored); knn and "
            "linear on frozen features, test split, mean/sd over 3 seeds; 28 px (MobileNetV2 "
            "at 112 px, bilinear); adrenalmnist3d as 28^3 volumes",
            "pretraining": {name: pretraining_summary(out, name) for name in made},
            "table": summarise(out, labels),
        },
    )


if __name__ == "__main__":
    main()
