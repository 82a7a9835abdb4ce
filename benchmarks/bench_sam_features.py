"""Does a medical foundation encoder give better frozen features than ImageNet? LiteMedSAM's
pooled image-encoder features (``litemedsam``, 256 px) against the ImageNet MobileNetV2 at
112 px (the size of ``pretrain.json``), 224 px (its pretrained size) and 256 px (LiteMedSAM's
input size), on breastmnist, pneumoniamnist and retinamnist at 28 px, bilinear resize, fp32.

Every run is a ``clinadapt bench`` record (method ``linear``, the probe's C chosen on the
validation split; 10 shots with ``--seeds`` seeds, all labels with one), so a second call skips
what exists. LiteMedSAM's encoder costs seconds per image on a CPU thread, so by default every
backbone sees the same stratified subsets of the splits (``--max-train`` / ``--max-val`` /
``--max-test`` images, seed 0, written as MedMNIST files under ``--out``/data; 0 keeps a
split whole); ``all`` shots then means the whole training subset. ``--full-reference`` adds
MobileNetV2 at 224 px on the full splits, to show what the subsets change.

Writes ``results/sam_features.json``: per dataset, model and shots the test AUC / ACC mean ± sd
over seeds, the paired difference to MobileNetV2 at 224 px (same support sets), feature
dimension, input size, and feature extraction seconds per image (fp32, from the run that
extracted; ``--threads`` torch threads).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from _common import SHARED, command, default_data_root, default_weights, machine, write_result

DATASETS = ("breastmnist", "retinamnist", "pneumoniamnist")
REFERENCE = "mobilenetv2 ImageNet 224 px"


def models(litemedsam: str, mobilenet: str) -> dict[str, dict[str, Any]]:
    """The compared backbones: name, weights and input size (None: the backbone's own)."""
    out = {"litemedsam 256 px": {"backbone": "litemedsam", "weights": litemedsam, "size": None}}
    for size in (112, 224, 256):
        out[f"mobilenetv2 ImageNet {size} px"] = {
            "backbone": "mobilenetv2_100",
            "weights": mobilenet,
            "size": size,
        }
    return out


def subset_root(source: Path, target: Path, caps: dict[str, int], seed: int) -> Path:
    """MedMNIST files holding a stratified sample of at most ``caps[split]`` images of each
    split (0: all), made once: an existing file is kept as it is (the JSON reports the sizes
    of the files used), and the same files serve every backbone."""
    from sklearn.model_selection import train_test_split

    target.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:
        path = target / f"{name}.npz"
        if path.exists():
            continue
        arrays = dict(np.load(source / f"{name}.npz"))
        for split, cap in caps.items():
            labels = arrays[f"{split}_labels"]
            if 0 < cap < len(labels):
                keep, _ = train_test_split(
                    np.arange(len(labels)),
                    train_size=cap,
                    stratify=labels.reshape(len(labels), -1)[:, 0],
                    random_state=seed,
                )
                keep = np.sort(keep)
                arrays[f"{split}_images"] = arrays[f"{split}_images"][keep]
                arrays[f"{split}_labels"] = labels[keep]
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
    return target


def split_sizes(root: Path) -> dict[str, dict[str, int]]:
    sizes = {}
    for name in DATASETS:
        with np.load(root / f"{name}.npz") as arrays:
            sizes[name] = {s: len(arrays[f"{s}_labels"]) for s in ("train", "val", "test")}
    return sizes


def run(
    records: Path, data_root: str, spec: dict[str, Any], dataset: str, args: argparse.Namespace
) -> None:
    from clinadapt.runner.bench import GridConfig, run_grid

    base: dict[str, Any] = {
        "data_root": data_root,
        "resize": "bilinear",
        "precision": "fp32",
        "bootstrap": 1000,
        "cache_dir": str(Path(args.out) / "cache"),
    }
    if spec["size"] is not None:
        base["input_size"] = spec["size"]
    for shots, seeds in (("10", args.seeds), ("all", 1)):
        grid = GridConfig(
            datasets=[dataset],
            backbones=[spec["backbone"]],
            weights=[spec["weights"]],
            methods=["linear"],
            shots=[shots],
            seeds=seeds,
            base=base,
        )
        start = time.perf_counter()
        counts = run_grid(grid, records, progress=False)
        print(f"{dataset} {spec['backbone']} {spec['size']} shots={shots}: {counts} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


def model_name(record: dict[str, Any]) -> str:
    size = record["preprocessing"]["input_size"]
    if record["config"]["backbone"] == "litemedsam":
        return f"litemedsam {size} px"
    return f"mobilenetv2 ImageNet {size} px"


def extraction(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Seconds per image over the splits whose features a run extracted itself (cache miss);
    None when every split came from an earlier call's cache."""
    seconds, images = {}, {}
    for r in records:
        for split, hit in r["feature_cache_hits"].items():
            if not hit and split not in seconds:
                seconds[split] = r["timings"][f"features_{split}_s"]
                images[split] = r["dataset"]["split_sizes"][split]
    if not seconds:
        return None
    total_s, total_n = sum(seconds.values()), sum(images.values())
    return {"seconds_per_image": total_s / total_n, "images": total_n, "seconds": total_s}


def summarise(folder: Path) -> list[dict[str, Any]]:
    """Rows (dataset, model, shots) with AUC / ACC mean ± sd over seeds."""
    from clinadapt.runner.records import read_records

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    features: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in read_records(folder):
        if not r.get("failed"):
            groups[(r["dataset"]["name"], model_name(r), str(r["config"]["shots"]))].append(r)
            features[(r["dataset"]["name"], model_name(r))].append(r)
    rows = []
    for (dataset, model, shots), runs in sorted(groups.items()):
        runs.sort(key=lambda r: r["config"]["seed"])
        row: dict[str, Any] = {"dataset": dataset, "model": model, "shots": shots}
        row["seeds"] = [r["config"]["seed"] for r in runs]
        for metric in ("auc", "acc"):
            values = np.array([r["metrics"]["test"][metric] for r in runs])
            row[metric] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                "per_seed": values.tolist(),
            }
            if len(runs) == 1 and "test_ci95" in runs[0]["metrics"]:
                row[metric]["interval95"] = runs[0]["metrics"]["test_ci95"][metric]
        first = runs[0]
        row["feature_dim"] = first["backbone"]["feature_dim"]
        row["input_size"] = first["preprocessing"]["input_size"]
        row["precision"] = first["preprocessing"]["precision"]
        row["split_sizes"] = first["dataset"]["split_sizes"]
        row["labels_used"] = first["labels_used"]["total"]
        row["extraction"] = extraction(features[(dataset, model)])
        row["weights"] = first["backbone"]["weights"]
        rows.append(row)
    by_key = {(r["dataset"], r["model"], r["shots"]): r for r in rows}
    for row in rows:
        ref = by_key.get((row["dataset"], REFERENCE, row["shots"]))
        if ref is None or row["model"] == REFERENCE or ref["seeds"] != row["seeds"]:
            continue
        for metric in ("auc", "acc"):
            diff = np.subtract(row[metric]["per_seed"], ref[metric]["per_seed"])
            row[f"{metric}_minus_reference"] = {
                "mean": float(diff.mean()),
                "sd": float(diff.std(ddof=1)) if len(diff) > 1 else None,
            }
    return rows


def extraction_costs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Feature extraction seconds per image of each model, pooled over the datasets."""
    seconds: dict[str, float] = defaultdict(float)
    images: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["extraction"] and row["shots"] == "all":  # one row per (dataset, model)
            seconds[row["model"]] += row["extraction"]["seconds"]
            images[row["model"]] += row["extraction"]["images"]
    return {m: {"seconds_per_image": seconds[m] / images[m], "images": images[m]} for m in seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--litemedsam", default=str(SHARED / "weights" / "litemedsam"))
    parser.add_argument("--mobilenet", default=default_weights("mobilenetv2_100"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the 10-shot runs")
    parser.add_argument("--max-train", type=int, default=200, help="training images (0: all)")
    parser.add_argument("--max-val", type=int, default=50, help="validation images (0: all)")
    parser.add_argument("--max-test", type=int, default=200, help="test images (0: all)")
    parser.add_argument(
        "--full-reference", action="store_true", help="also MobileNetV2 224 px on full splits"
    )
    parser.add_argument("--models", default="", help="run only models containing one of (a,b)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="/work/measure/sam_features", help="records and cache")
    parser.add_argument("--summarise-only", action="store_true", help="write the JSON only")
    parser.add_argument("--note", default="", help="how this result came about, for the JSON")
    args = parser.parse_args()
    if args.data_root is None or not Path(args.litemedsam).is_dir() or args.mobilenet == "none":
        raise SystemExit(
            "bench_sam_features needs the MedMNIST files (--data-root or $CLINADAPT_DATA), "
            "the LiteMedSAM folder (--litemedsam) and the ImageNet MobileNetV2 weights"
        )
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    caps = {"train": args.max_train, "val": args.max_val, "test": args.max_test}
    subsets = subset_root(Path(args.data_root), out / "data", caps, seed=0)
    chosen = models(args.litemedsam, args.mobilenet)
    wanted = [m for m in args.models.split(",") if m]
    chosen = {k: v for k, v in chosen.items() if not wanted or any(m in k for m in wanted)}
    # the cheap models first, LiteMedSAM dataset by dataset from the smallest
    order = sorted(chosen, key=lambda name: name.startswith("litemedsam"))
    for dataset in [] if args.summarise_only else args.datasets.split(","):
        for name in order:
            run(out / "records" / "subset", str(subsets), chosen[name], dataset, args)
        if args.full_reference:
            spec = models(args.litemedsam, args.mobilenet)[REFERENCE]
            run(out / "records" / "full", args.data_root, spec, dataset, args)
    subset_rows = summarise(out / "records" / "subset")
    write_result(
        "sam_features",
        {
            "command": command(),
            "machine": machine(),
            "protocol": {
                "method": "linear (logistic regression on frozen pooled features, C chosen on "
                "the validation images a run may use: 10 per class at 10 shots, all at all)",
                "shots": {"10": f"seeds 0..{args.seeds - 1}", "all": "seed 0"},
                "source_size": 28,
                "resize": "bilinear to each model's input size",
                "precision": "fp32",
                "litemedsam": "image encoder's 256 x 64 x 64 embedding averaged over space "
                "(256 features); input uint8 / 255 at 256 x 256 (no per-image min-max)",
                "mobilenetv2": "ImageNet weights (TF2 PTQ export), 1280 pooled features, "
                "ImageNet mean/std; 112, 224 and 256 px",
                "subsets": {
                    "max_images_this_call": caps,
                    "split_sizes": split_sizes(subsets),
                    "how": "stratified by label (sklearn train_test_split, random_state 0); "
                    "the same images for every model; 'all' shots = the whole training subset",
                    "files": str(out / "data"),
                },
                "timing": f"feature extraction of every split by the run that extracted them, "
                f"{args.threads} torch thread(s) on a 2-core machine shared with other work",
                "records": str(out / "records"),
                "note": args.note or None,
            },
            "rows": subset_rows,
            "extraction_seconds_per_image": extraction_costs(subset_rows),
            "full_splits_reference": summarise(out / "records" / "full")
            if (out / "records" / "full").is_dir()
            else [],
        },
    )


if __name__ == "__main__":
    main()
