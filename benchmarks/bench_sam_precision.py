"""LiteMedSAM's image encoder in fp32 against bf16 autocast on real images: throughput, and what
bf16 does to zero-shot box-prompted Dice.

Test images of kvasir_seg (default all 200), optionally dsb2018_nuclei (one box per nucleus) and
axial slices with foreground of a few hippocampus_msd volumes, each prepared as the prompted
runner does (``sam.preprocess``, one image at a time, oracle ground-truth boxes without jitter,
one per connected component or instance, masks back at the image's own size). Every image goes
through the encoder in both precisions, the order alternating from image to image, each pass
timed; the first image is run once untimed in both first (oneDNN builds its kernels on first
use). Three predictions per image:

- ``fp32``: encoder and mask decoder in fp32 (what ``runner/prompted.py`` does);
- ``bf16_encoder``: the encoder under bf16 autocast, its embedding back to fp32 for the decoder;
- ``bf16_all``: encoder and decoder under bf16 autocast.

Per dataset: images/s of each encoder pass and their ratio, per-image Dice of each prediction
against the ground truth, mean Dice, the mean difference to fp32 with its 95% bootstrap
interval over images, the mean / max |difference|, and the cosine
similarity of the bf16 and fp32 embeddings (whole map and spatial mean). ``--batched`` adds a
throughput measurement at ``--batch-size`` images per pass (as feature extraction runs).
The verdict applies the rule that bf16 is never a default where it costs more than
``MAX_DICE_COST`` mean Dice. Writes ``results/sam_precision.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import RESULTS, SHARED, command, machine, write_result

MAX_DICE_COST = 0.005
VARIANTS = ("fp32", "bf16_encoder", "bf16_all")
PROMPT_BATCH = 16


def bf16() -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def cases(dataset: str, root: str, n: int) -> tuple[list[tuple], int]:
    """(name, image, label map, instances or None) of the first ``n`` 2D test cases (volumes
    give their axial slices with foreground, volume by volume), and the number of classes."""
    from clinadapt.data import load_dataset
    from clinadapt.data.seg_files import read_instances

    data = load_dataset(dataset, root=root)
    split = data["test"]
    meta = split.meta or [{} for _ in range(len(split))]
    out = []
    for i in range(len(split)):
        image, mask = np.asarray(split.images[i]), np.asarray(split.labels[i])
        name = str(meta[i].get("id", i))
        if mask.ndim == 3:
            out += [
                (f"{name}/z{z}", image[z], mask[z], None) for z in range(len(mask)) if mask[z].any()
            ]
        else:
            paths = meta[i].get("instances")
            out.append((name, image, mask, read_instances(paths, mask.shape) if paths else None))
        if len(out) >= n:
            break
    return out[:n], data.info.num_classes


def predict(model: Any, embedding: torch.Tensor, frame: Any, prompts: list, k: int) -> np.ndarray:
    """The label map of one image from its embedding, as ``runner/prompted.py`` makes it: each
    class the max of its prompts' logits, the highest class where that is above 0."""
    best = torch.full((k - 1, *frame.original_size), -torch.inf)
    for start in range(0, len(prompts), PROMPT_BATCH):
        chunk = prompts[start : start + PROMPT_BATCH]
        boxes = frame.boxes(np.stack([p.box for p in chunk]))
        logits = frame.logits(model.predict_masks(embedding, boxes=boxes).float())
        for prompt, logit in zip(chunk, logits, strict=True):
            torch.maximum(best[prompt.label - 1], logit, out=best[prompt.label - 1])
    top, arg = best.max(dim=0)
    return torch.where(top > 0, arg + 1, 0).numpy()


def dice(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    """Mean over foreground classes (1 where a class is absent from both)."""
    values = []
    for c in range(1, k):
        p, t = pred == c, target == c
        total = int(p.sum() + t.sum())
        values.append(1.0 if total == 0 else 2.0 * int((p & t).sum()) / total)
    return float(np.mean(values))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def timed_embed(model: Any, x: torch.Tensor, precision: str) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with bf16() if precision == "bf16" else nullcontext():
        embedding = model.embed_image(x)
    return embedding, time.perf_counter() - start


def measure(model: Any, dataset: str, items: list, k: int) -> dict[str, Any]:
    from clinadapt.backbones.sam import preprocess
    from clinadapt.data.prompts import oracle_prompts

    rows = []
    for index, (name, image, mask, instances) in enumerate(items):
        prompts = oracle_prompts(mask, instances=instances, jitter=0)
        x, frame = preprocess(image, model.image_size, name=name)
        x = x[None]
        order = ("fp32", "bf16") if index % 2 == 0 else ("bf16", "fp32")
        embeddings, times = {}, {}
        for precision in order:
            embeddings[precision], times[precision] = timed_embed(model, x, precision)
        e32, e16 = embeddings["fp32"], embeddings["bf16"]
        row: dict[str, Any] = {
            "id": name,
            "prompts": len(prompts),
            "fp32_s": times["fp32"],
            "bf16_s": times["bf16"],
            "cosine": cosine(e32, e16.float()),
            "pooled_cosine": cosine(e32.mean(dim=(2, 3)), e16.float().mean(dim=(2, 3))),
        }
        if prompts:
            preds = {
                "fp32": predict(model, e32, frame, prompts, k),
                "bf16_encoder": predict(model, e16.float(), frame, prompts, k),
            }
            with bf16():
                preds["bf16_all"] = predict(model, e16, frame, prompts, k)
            row["dice"] = {v: dice(preds[v], mask, k) for v in VARIANTS}
            row["changed_pixels"] = {
                v: int((preds[v] != preds["fp32"]).sum()) for v in VARIANTS[1:]
            }
        rows.append(row)
        if index % 20 == 0:
            print(f"  {dataset} {index + 1}/{len(items)} {row.get('dice')}", flush=True)
    return summarise(dataset, rows)


def mean_interval(values: np.ndarray, resamples: int = 2000) -> list[float]:
    """95% bootstrap interval (over images, seed 0) of the mean of ``values``."""
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return np.percentile(means, [2.5, 97.5]).tolist()


def summarise(dataset: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput, embedding agreement and Dice differences of one dataset's per-image rows."""
    n = len(rows)
    seconds = {p: sum(r[f"{p}_s"] for r in rows) for p in ("fp32", "bf16")}
    scored = [r for r in rows if "dice" in r]
    d = {v: np.array([r["dice"][v] for r in scored]) for v in VARIANTS}
    per_image_ratio = np.array([r["fp32_s"] / r["bf16_s"] for r in rows])
    cos = np.array([r["cosine"] for r in rows])
    pooled = np.array([r["pooled_cosine"] for r in rows])
    out: dict[str, Any] = {
        "dataset": dataset,
        "images": n,
        "scored_images": len(scored),
        "throughput": {
            "batch_size": 1,
            "fp32_images_per_s": n / seconds["fp32"],
            "bf16_images_per_s": n / seconds["bf16"],
            "speedup_bf16_over_fp32": seconds["fp32"] / seconds["bf16"],
            "per_image_speedup_median": float(np.median(per_image_ratio)),
            "per_image_speedup_p10_p90": np.percentile(per_image_ratio, [10, 90]).tolist(),
        },
        "embedding_cosine": {
            "mean": float(cos.mean()),
            "min": float(cos.min()),
            "pooled_mean": float(pooled.mean()),
            "pooled_min": float(pooled.min()),
        },
        "dice_mean": {v: float(d[v].mean()) for v in VARIANTS},
    }
    for v in VARIANTS[1:]:
        diff = d[v] - d["fp32"]
        out[f"dice_{v}_minus_fp32"] = {
            "mean": float(diff.mean()),
            "interval95": mean_interval(diff),
            "mean_abs": float(np.abs(diff).mean()),
            "max_abs": float(np.abs(diff).max()),
            "worst_image": scored[int(np.abs(diff).argmax())]["id"],
            "images_changed_more_than_0.01": int((np.abs(diff) > 0.01).sum()),
        }
    out["per_image"] = rows
    return out


def batched_throughput(
    model: Any, images: list[np.ndarray], batch_size: int, repeats: int
) -> dict[str, Any]:
    """Images/s of each precision on batches of ``batch_size``, alternating in ABBA order."""
    from clinadapt.backbones.sam import preprocess

    x = torch.stack([preprocess(im, model.image_size)[0] for im in images])
    batches = list(torch.split(x, batch_size))
    timed_embed(model, batches[0], "fp32")
    timed_embed(model, batches[0], "bf16")
    seconds = {"fp32": 0.0, "bf16": 0.0}
    for r in range(repeats):
        for i, batch in enumerate(batches):
            order = ("fp32", "bf16") if (r + i) % 2 == 0 else ("bf16", "fp32")
            for precision in order:
                seconds[precision] += timed_embed(model, batch, precision)[1]
    n = len(images) * repeats
    return {
        "batch_size": batch_size,
        "images": len(images),
        "repeats": repeats,
        "fp32_images_per_s": n / seconds["fp32"],
        "bf16_images_per_s": n / seconds["bf16"],
        "speedup_bf16_over_fp32": seconds["fp32"] / seconds["bf16"],
    }


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """bf16 may be a default only where it costs at most ``MAX_DICE_COST`` mean Dice
    (fp32 minus bf16); ``within_bound_at_95`` also asks the interval's worst end to stay
    within it, which few images or small structures (noisy per-image Dice) may not allow."""
    out: dict[str, Any] = {"max_dice_cost": MAX_DICE_COST}
    for v in VARIANTS[1:]:
        diffs = {r["dataset"]: r[f"dice_{v}_minus_fp32"] for r in results}
        costs = {name: -d["mean"] for name, d in diffs.items()}
        worst = {name: -d["interval95"][0] for name, d in diffs.items()}
        out[v] = {
            "mean_dice_cost": costs,
            "mean_dice_cost_interval95_worst_end": worst,
            "allowed_as_default": all(c <= MAX_DICE_COST for c in costs.values()),
            "within_bound_at_95": {n: c <= MAX_DICE_COST for n, c in worst.items()},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=str(SHARED / "data"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "litemedsam"))
    parser.add_argument(
        "--datasets", default="kvasir_seg", help="kvasir_seg, dsb2018_nuclei, hippocampus_msd"
    )
    parser.add_argument("--n", default="200", help="images per dataset: one number, or a,b,c")
    parser.add_argument("--batched", type=int, default=16, help="images for batched timing (0: no)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the batched timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--resummarise",
        action="store_true",
        help="recompute the summaries and verdict of results/sam_precision.json from its "
        "per-image rows, measuring nothing",
    )
    args = parser.parse_args()
    if args.resummarise:
        resummarise(RESULTS / "sam_precision.json")
        return
    if not Path(args.data_root).is_dir() or not Path(args.weights).exists():
        raise SystemExit(
            f"bench_sam_precision needs the segmentation data (--data-root, {args.data_root}) "
            f"and LiteMedSAM (--weights, {args.weights})"
        )
    from clinadapt.backbones.sam import load_sam, preprocess

    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    model = load_sam(args.weights).eval()
    datasets = args.datasets.split(",")
    counts = [int(c) for c in args.n.split(",")]
    counts = counts * len(datasets) if len(counts) == 1 else counts
    start = time.perf_counter()
    results = []
    with torch.inference_mode():
        for dataset, n in zip(datasets, counts, strict=True):
            items, k = cases(dataset, args.data_root, n)
            warm = preprocess(items[0][1], model.image_size)[0][None]
            for precision in ("fp32", "bf16"):
                timed_embed(model, warm, precision)
            results.append(measure(model, dataset, items, k))
            print(dataset, {k: v for k, v in results[-1].items() if k != "per_image"}, flush=True)
        batched = None
        if args.batched:
            items = cases(datasets[0], args.data_root, args.batched)[0]
            images = [item[1] for item in items]
            batched = {"dataset": datasets[0]}
            batched.update(batched_throughput(model, images, args.batch_size, args.repeats))
    write_result(
        "sam_precision",
        {
            "command": command(),
            "machine": {**machine(), "load_average_before": load_before},
            "model": {
                "weights": args.weights,
                "sha256": model.checkpoint.sha256 if model.checkpoint else None,
                "image_size": model.image_size,
            },
            "protocol": {
                "prompts": "oracle: each test image's ground-truth bounding box of every "
                "connected component (DSB2018: every nucleus instance), no jitter",
                "preprocessing": "clinadapt.backbones.sam.preprocess, one image per encoder pass",
                "bf16": "torch.autocast('cpu', dtype=torch.bfloat16)",
                "timing": "encoder pass only (embed_image), wall clock, fp32 and bf16 alternating "
                f"in order image by image, after one untimed warm-up pass of each; "
                f"{args.threads} torch thread(s) on a 2-core machine shared with other work",
                "dice": "per image, mean over foreground classes of the label map at the "
                "image's own size (1 where a class is absent from both); hippocampus_msd: "
                "each axial slice with foreground of the first test volumes scored as a 2D "
                "image (anterior and posterior hippocampus)",
            },
            "verdict": verdict(results),
            "datasets": results,
            "batched_throughput": batched,
            "total_s": time.perf_counter() - start,
        },
    )


def resummarise(path: Path) -> None:
    result = json.loads(path.read_text())
    result["datasets"] = [summarise(d["dataset"], d["per_image"]) for d in result["datasets"]]
    result["verdict"] = verdict(result["datasets"])
    result["resummarised_by"] = command()
    write_result("sam_precision", result)


if __name__ == "__main__":
    main()
