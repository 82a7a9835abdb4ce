"""Test-time adaptation, calibration and adaptive temperature under distribution shift.

Source models, trained (or fitted) once on each dataset's clean training split:
``linear_mobilenetv2`` (a linear probe on ImageNet MobileNetV2 features), ``lora_mobilenetv2`` and
``full_mobilenetv2`` (MobileNetV2 fine-tuned with LoRA or fully), ``resnet18_28`` (the MedMNIST v2
ResNet-18, from scratch) and ``vit_t_28`` (a small ViT, from scratch). On adrenalmnist3d the
from-scratch sources are their 3D versions (``resnet18_3d``, ``vit3d_t_28``) and MobileNetV2 reads
the volumes slice by slice.

Each source is tested on the clean test split and on shifted ones: MedMNIST-C corruptions of the
test split (``--corruptions``, ``--severities``; ``all`` is every corruption MedMNIST-C defines for
the dataset) for the 2D datasets, the 64^3 release for adrenalmnist3d (trained at 28^3), with every
test-time adaptation method (``--ttas``) at every batch size (``--batch-sizes``), each test set
one stream adapted continually from the source (in episodic mode one-step tent, eata and sar
predict what bn or the source predicts). ViT sources are also tested with the adaptive-temperature
softmax (output, attention, both). Each run is a ``clinadapt bench`` record under ``--out``
(resumable: a second call runs only what is missing, so a protocol can be run in parts, e.g. one
call per dataset and source with its own ``--epochs``); a trained source is trained once and
tested under every setting. Every call that ran grids is logged in ``--out``; the JSON is written
from all records there, with the calls and what the defaults would add (``not_run``).

The JSON (``results/tta.json``) has a row per test set and setting (AUC, ACC, ECE before and
after temperature scaling, the change against the same source without tta on the same set,
seconds per image), the mean over corruptions per severity and over all shifted sets, how often
each method collapsed (accuracy more than 5 points below the unadapted source on the same set),
the adaptive-temperature comparison and temperature scaling's ECE before and after on every
dataset.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from _common import command, default_data_root, default_weights, machine, write_result
from clinadapt.paths import cache_home
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.records import read_records

DATASETS = ("breastmnist", "pneumoniamnist", "retinamnist", "adrenalmnist3d")
VOLUMES = {"adrenalmnist3d": "size:64"}
"""3D datasets and their shift: the 64^3 release of the test split, read as the 28^3 one."""
SOURCES = {  # name -> backbone, weights ("mobilenetv2": the local ImageNet weights), method
    "linear_mobilenetv2": ("mobilenetv2_100", "mobilenetv2", "linear"),
    "lora_mobilenetv2": ("mobilenetv2_100", "mobilenetv2", "lora"),
    "full_mobilenetv2": ("mobilenetv2_100", "mobilenetv2", "full"),
    "resnet18_28": ("resnet18_28", "none", "full"),
    "vit_t_28": ("vit_t_28", "none", "full"),
}
VOLUME_BACKBONES = {"resnet18_28": "resnet18_3d", "vit_t_28": "vit3d_t_28"}
VITS = ("vit_t_28", "vit3d_t_28")
TTAS = ("none", "bn", "tent", "sar", "eata", "t3a", "lame")
ADAPTIVE = ("output", "attention", "both")
EATA_D_MARGIN = 0.4
"""EATA's redundancy margin: the paper's CIFAR-10 value. Its ImageNet default (0.05) lets almost
no sample through after the first batch when there are 2-5 classes."""
COLLAPSE_POINTS = 5.0
CALLS = "calls.jsonl"
"""In ``--out``: one line per call that ran grids (its command and wall time)."""
METRICS = ("auc", "acc", "ece", "ece_after_t")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument(
        "--corruptions", default="all", help="MedMNIST-C corruptions (comma separated) or all"
    )
    parser.add_argument("--severities", default="1,2,3,4,5")
    parser.add_argument(
        "--ttas",
        default=",".join(TTAS),
        help="tta methods (bn is left out for ViTs: no batch norm)",
    )
    parser.add_argument("--batch-sizes", default="16,64", help="tta batch sizes")
    parser.add_argument(
        "--tta-mode",
        default="continual",
        choices=("episodic", "continual"),
        help="continual: adapt along each test set's stream from the source model (episodic "
        "resets before every batch, where one-step tent, eata and sar predict what bn (batch-norm "
        "networks) or the source (others) predicts)",
    )
    parser.add_argument(
        "--adaptive", default=",".join(ADAPTIVE), help="adaptive-temperature settings of ViTs"
    )
    parser.add_argument(
        "--tta-options",
        default="",
        help="YAML {method: {option: value or [values]}} over the defaults (EATA d_margin "
        f"{EATA_D_MARGIN}), e.g. '{{tent: {{lr: [0.0025, 0.01]}}}}' (a list is a grid)",
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the library's)"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="input size of the MobileNetV2 sources (default: 224, its pretrained size)",
    )
    parser.add_argument("--out", default=str(cache_home() / "bench_tta"))
    parser.add_argument(
        "--summarise-only", action="store_true", help="write the JSON from the records, run nothing"
    )
    parser.add_argument(
        "--note", default="", help="why the records hold what they hold (kept in the protocol)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    if not args.summarise_only:
        started = time.perf_counter()
        for dataset in args.datasets.split(","):
            for source in args.sources.split(","):
                for grid in grids(dataset, source, args):
                    counts = run_grid(grid, out, progress=False)
                    mode = grid.base.get("adaptive_temperature", "off")
                    print(dataset, source, f"adaptive {mode}", counts, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with (out / CALLS).open("a") as log:
            log.write(json.dumps({"command": command(), "wall_s": time.perf_counter() - started}))
            log.write("\n")
    records = read_records(out)
    rows = [_row(r) for r in records if not r.get("failed")]
    _add_deltas(rows)
    write_result(
        "tta",
        rounded(
            {
                "protocol": protocol(out, records, args.note),
                "mean_over_corruptions": mean_over_corruptions(rows),
                "by_severity": by_severity(rows),
                "collapses": collapses(rows),
                "adaptive_temperature": adaptive_rows(rows),
                "temperature_scaling": temperature_rows(rows),
                "rows": rows,
                "failed": [
                    {"run": r["config"], "error": r["error"]} for r in records if r.get("failed")
                ],
            }
        ),
    )


def rounded(value: Any) -> Any:
    """Floats to 5 decimals (seconds per image stay readable, metrics far below their noise)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def source_of(dataset: str, source: str) -> tuple[str, str, str]:
    """(backbone, weights, method) of ``source`` on ``dataset``."""
    backbone, weights, method = SOURCES[source]
    if dataset in VOLUMES:
        backbone = VOLUME_BACKBONES.get(source, backbone)
    if weights == "mobilenetv2":
        weights = default_weights("mobilenetv2_100")
    return backbone, weights, method


def shifts(dataset: str, args: argparse.Namespace) -> list[str]:
    if dataset in VOLUMES:
        return ["none", VOLUMES[dataset]]
    return ["none"] + [
        f"medmnistc:{corruption}:{severity}"
        for corruption in args.corruptions.split(",")
        for severity in args.severities.split(",")
    ]


def grids(dataset: str, source: str, args: argparse.Namespace) -> list[GridConfig]:
    """The tta grid of ``source`` on ``dataset``, then (ViTs) one grid per adaptive-temperature
    setting without tta."""
    backbone, weights, method = source_of(dataset, source)
    base: dict[str, Any] = {
        "data_root": args.data_root,
        "bootstrap": 0,
        "precision": "fp32",
        "tta_mode": args.tta_mode,
        "reliability_diagram": False,
    }
    if method != "linear" and args.epochs:
        base["train"] = {"epochs": args.epochs}
    if backbone == "mobilenetv2_100" and args.input_size:
        base["input_size"] = args.input_size
    common = dict(
        datasets=[dataset],
        backbones=[backbone],
        weights=[weights],
        methods=[method],
        shots=["all"],
        seeds=args.seeds,
        shifts=shifts(dataset, args),
    )
    ttas = [t for t in args.ttas.split(",") if not (t == "bn" and backbone in VITS)]
    given = yaml.safe_load(args.tta_options) or {}
    options = {"eata": {"d_margin": EATA_D_MARGIN}} | {
        name: {**({"d_margin": EATA_D_MARGIN} if name == "eata" else {}), **values}
        for name, values in given.items()
    }
    out = [
        GridConfig(
            **common,
            base=base,
            ttas=ttas,
            tta_batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
            tta_options={name: values for name, values in options.items() if name in ttas},
        )
    ]
    if backbone in VITS:
        for mode in [m for m in args.adaptive.split(",") if m]:
            out.append(GridConfig(**common, base={**base, "adaptive_temperature": mode}))
    return out


def _row(record: dict[str, Any]) -> dict[str, Any]:
    cfg = record["config"]
    spec = record["dataset"]["provenance"]["shift"]["spec"]
    parts = spec.split(":")
    calibration = record["calibration"]["test"]
    adapted = record["tta"].get("applied", False)
    row = {
        "dataset": record["dataset"]["name"],
        "source": _source_name(cfg),
        "seed": cfg["seed"],
        "shift": spec,
        "corruption": parts[1] if parts[0] == "medmnistc" else (spec if spec != "none" else None),
        "severity": int(parts[2]) if parts[0] == "medmnistc" else None,
        "tta": cfg["tta"],
        "tta_options": ",".join(f"{k}={v}" for k, v in sorted(cfg["tta_options"].items())),
        "batch_size": cfg["tta_batch_size"] if adapted else None,
        "adaptive_temperature": cfg["adaptive_temperature"],
        "n": record["dataset"]["split_sizes"]["test"],
        "auc": record["metrics"]["test"]["auc"],
        "acc": record["metrics"]["test"]["acc"],
        "ece": calibration["before"]["ece"],
        "ece_after_t": calibration.get("after", {}).get("ece"),
        "temperature": record["calibration"].get("temperature"),
        "seconds_per_image": record["tta"]["seconds_per_image"],
    }
    if adapted:
        stats = record["tta"]["stats"]
        row.update({k: stats[k] for k in ("adapted", "filtered", "updates", "resets")})
        row["tta_inputs"] = record["tta"]["inputs"]
    if record["kind"] == "frozen" and not record["feature_cache_hits"]["test"]:
        row["extract_s_per_image"] = record["timings"]["features_test_s"] / row["n"]
    return row


def _source_name(cfg: dict[str, Any]) -> str:
    for name in SOURCES:
        backbone, _, method = SOURCES[name]
        if cfg["method"] != method:
            continue
        if backbone == cfg["backbone"] or VOLUME_BACKBONES.get(name) == cfg["backbone"]:
            return name
    return f"{cfg['backbone']}/{cfg['method']}"


def _key(row: dict[str, Any]) -> tuple:
    return (row["dataset"], row["source"], row["seed"], row["shift"])


def _add_deltas(rows: list[dict[str, Any]]) -> None:
    """Each row's change against the unadapted source (tta none, adaptive temperature off) on
    the same test set, and whether it collapsed."""
    plain = {_key(r): r for r in rows if r["tta"] == "none" and r["adaptive_temperature"] == "off"}
    for row in rows:
        ref = plain.get(_key(row))
        if ref is None:
            continue
        for m in METRICS:
            if row[m] is not None and ref[m] is not None:
                row[f"delta_{m}"] = row[m] - ref[m]
        row["overhead_s_per_image"] = row["seconds_per_image"] - ref["seconds_per_image"]
        row["collapsed"] = 100 * (ref["acc"] - row["acc"]) > COLLAPSE_POINTS


def _setting(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in SETTING)


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"sets": len({r["shift"] for r in rows}), "runs": len(rows)}
    for m in METRICS:
        out[m] = _mean(rows, m)
        out[f"delta_{m}"] = _mean(rows, f"delta_{m}")
    out["seconds_per_image"] = _mean(rows, "seconds_per_image")
    out["overhead_s_per_image"] = _mean(rows, "overhead_s_per_image")
    out["collapsed"] = sum(bool(r.get("collapsed")) for r in rows)
    out["resets"] = sum(r.get("resets", 0) for r in rows)
    return out


def _grouped(rows: list[dict[str, Any]], key) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def _named(key: tuple, names: tuple[str, ...]) -> dict[str, Any]:
    return dict(zip(names, key, strict=True))


SETTING = ("dataset", "source", "tta", "tta_options", "batch_size", "adaptive_temperature")


def mean_over_corruptions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per source, dataset and setting: the clean test set, and the mean over every shifted
    set (all corruptions and severities; for adrenalmnist3d the one 64^3 set)."""
    out = []
    for key, group in sorted(_grouped(rows, _setting).items(), key=lambda kv: str(kv[0])):
        clean = [r for r in group if r["shift"] == "none"]
        shifted = [r for r in group if r["shift"] != "none"]
        out.append({**_named(key, SETTING), "clean": _summary(clean), "shifted": _summary(shifted)})
    return out


def by_severity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per source, dataset, setting and severity: the mean over corruptions."""
    shifted = [r for r in rows if r["severity"] is not None]
    out = []
    for key, group in sorted(
        _grouped(shifted, lambda r: (*_setting(r), r["severity"])).items(),
        key=lambda kv: str(kv[0]),
    ):
        out.append({**_named(key, (*SETTING, "severity")), **_summary(group)})
    return out


def collapses(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per source, tta method and batch size, over every shifted set of every dataset: how often
    accuracy fell more than ``COLLAPSE_POINTS`` below the unadapted source on the same set, and
    how often AUC fell more than 0.05 (a collapse onto the majority class can keep accuracy)."""
    adapted = [
        r
        for r in rows
        if r["tta"] != "none" and r["shift"] != "none" and r["adaptive_temperature"] == "off"
    ]
    out = []
    groups = _grouped(adapted, lambda r: (r["source"], r["tta"], r["tta_options"], r["batch_size"]))
    for key, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        hit = [r for r in group if r.get("collapsed")]
        out.append(
            {
                **_named(key, ("source", "tta", "tta_options", "batch_size")),
                "collapsed": len(hit),
                "shifted_sets": len(group),
                "auc_drop_over_0.05": sum(r.get("delta_auc", 0.0) < -0.05 for r in group),
                "worst_acc_drop_points": max(
                    (-100 * r["delta_acc"] for r in group if "delta_acc" in r), default=None
                ),
                "where": sorted(f"{r['dataset']} {r['shift']}" for r in hit),
            }
        )
    return out


def adaptive_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ViT sources without tta: AUC and ECE clean and shifted (mean over every shifted set) per
    adaptive-temperature setting."""
    vits = [r for r in rows if r["tta"] == "none" and r["source"] == "vit_t_28"]
    out = []
    groups = _grouped(vits, lambda r: (r["dataset"], r["source"], r["adaptive_temperature"]))
    for key, group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        row = _named(key, ("dataset", "source", "adaptive_temperature"))
        for part, members in (
            ("clean", [r for r in group if r["shift"] == "none"]),
            ("shifted", [r for r in group if r["shift"] != "none"]),
        ):
            row[part] = {m: _mean(members, m) for m in ("auc", "acc", "ece")}
            row[part]["delta_auc"] = _mean(members, "delta_auc")
            row[part]["delta_ece"] = _mean(members, "delta_ece")
            row[part]["sets"] = len(members)
        out.append(row)
    return out


def temperature_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Temperature scaling (fitted on the clean validation outputs of the source) per source and
    dataset: ECE before and after on the clean test set, and the mean over shifted sets."""
    plain = [r for r in rows if r["tta"] == "none" and r["adaptive_temperature"] == "off"]
    out = []
    for key, group in sorted(
        _grouped(plain, lambda r: (r["dataset"], r["source"])).items(), key=lambda kv: str(kv[0])
    ):
        clean = [r for r in group if r["shift"] == "none"]
        shifted = [r for r in group if r["shift"] != "none"]
        out.append(
            {
                **_named(key, ("dataset", "source")),
                "temperature": _mean(clean, "temperature"),
                "clean": {"ece": _mean(clean, "ece"), "ece_after_t": _mean(clean, "ece_after_t")},
                "shifted": {
                    "ece": _mean(shifted, "ece"),
                    "ece_after_t": _mean(shifted, "ece_after_t"),
                    "sets": len(shifted),
                },
            }
        )
    return out


def protocol(out: Path, records: list[dict[str, Any]], note: str) -> dict[str, Any]:
    """What was run, read from the records and the calls logged in ``out``; what the defaults
    would run besides."""
    done = [r for r in records if not r.get("failed")]
    runs: dict[tuple, dict[str, Any]] = {}
    for record in done:
        cfg = record["config"]
        entry = runs.setdefault(
            (record["dataset"]["name"], _source_name(cfg)),
            {
                "backbone": cfg["backbone"],
                "weights": cfg["weights"],
                "method": cfg["method"],
                "input_size": record["preprocessing"].get("input_size"),
                "epochs_requested": None,
                "epochs_trained": None,
                "shifts": set(),
                "ttas": set(),
                "tta_options": set(),
                "batch_sizes": set(),
                "adaptive_temperature": set(),
                "records": 0,
            },
        )
        if record["kind"] == "finetune" and "trained_in" not in record:
            entry["epochs_requested"] = record["method"]["train"]["epochs"]
            entry["epochs_trained"] = len(record["history"])  # fewer: stopped early
        entry["shifts"].add(cfg["shift"])
        entry["ttas"].add(cfg["tta"])
        if cfg["tta_options"]:
            entry["tta_options"].add(f"{cfg['tta']}: {json.dumps(cfg['tta_options'])}")
        if record["tta"].get("applied"):
            entry["batch_sizes"].add(cfg["tta_batch_size"])
        entry["adaptive_temperature"].add(cfg["adaptive_temperature"])
        entry["records"] += 1
    calls = out / CALLS
    logged = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    missing = [(d, s) for d in DATASETS for s in SOURCES if (d, s) not in runs]
    return {
        "note": note,
        "full_protocol": "PYTHONPATH=src python benchmarks/bench_tta.py (the defaults: every "
        "source on every dataset, every MedMNIST-C corruption at severities 1-5, tta "
        f"{'/'.join(TTAS)} at batch sizes 16 and 64, continual, MobileNetV2 at 224 px, the "
        "library's training epochs)",
        "not_run": [
            {
                "dataset": d,
                "source": s,
                "command": f"OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_tta.py "
                f"--datasets {d} --sources {s} --out {out}",
            }
            for d, s in missing
        ],
        "summarised_by": command(),
        "calls": logged,
        "wall_s": sum(c["wall_s"] for c in logged),
        "run": [
            {"dataset": d, "source": s, **{k: _listed(v) for k, v in entry.items()}}
            for (d, s), entry in sorted(runs.items())
        ],
        "sources": {
            name: {
                "backbone": b,
                "weights": w,
                "method": m,
                "backbone_3d": VOLUME_BACKBONES.get(name),
            }
            for name, (b, w, m) in SOURCES.items()
        },
        "training": "shots all (the whole training split), the epoch chosen on the whole "
        "validation split, fp32; library defaults otherwise (TrainConfig), epochs as listed",
        "shifts": "MedMNIST-C corruptions of the test split (data seed 0), one test set per "
        "corruption and severity; adrenalmnist3d trained at 28^3 and tested on the 64^3 "
        "release's test split, brought to 28^3 by the run's preprocessing",
        "tta": "each test set is one stream in its released order; continual mode adapts from "
        "the source along it, episodic resets before every batch; the library's default "
        f"options except EATA d_margin = {EATA_D_MARGIN} (the ImageNet default 0.05 rejects "
        "nearly every sample with 2-5 classes) and the tta_options listed per run; bn is left "
        "out for ViTs (no batch norm). "
        "Trained sources adapt on the test images; the linear probe runs bn/tent/sar/eata "
        "through MobileNetV2 on the test images and none/t3a/lame on the extracted features "
        "(their seconds per image then exclude the backbone: extract_s_per_image in the rows "
        "where this bench computed the features)",
        "adaptive_temperature": "ViT sources with tta none: output, attention and both against "
        "off; the output rule is a no-op for binary tasks (entropy <= ln 2)",
        "calibration": "ECE with 15 equal-width bins, before and after temperature scaling "
        "fitted on the source's clean validation outputs (one T per source and dataset)",
        "collapse": f"accuracy more than {COLLAPSE_POINTS} points below the unadapted source "
        "(tta none) on the same test set",
        "not_measured": "bootstrap intervals (bootstrap=0); one seed unless listed",
        "records": str(out.resolve()),
        "machine": machine(),
    }


def _listed(value: Any) -> Any:
    return sorted(value, key=str) if isinstance(value, set) else value


if __name__ == "__main__":
    main()
