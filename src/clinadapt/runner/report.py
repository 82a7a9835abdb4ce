"""Markdown/HTML reports and PNG plots built only from run records."""

from __future__ import annotations

import html
import logging
import math
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.runner.records import read_records, record_task
from clinadapt.runner.text import text_summary

log = logging.getLogger(__name__)

METRIC_LABELS = {
    "auc": "AUC",
    "acc": "ACC",
    "balanced_accuracy": "balanced acc.",
    "dice": "Dice",
    "iou": "IoU",
    "hd95": "HD95",
    "nsd": "NSD",
}
"""Column titles of metrics; any other metric is titled by its name."""
DISTANCE_METRICS = frozenset({"hd95"})
"""Metrics in a case's distance unit (mm, or pixels where the spacing is unknown): lower is
better, unbounded above, shown with two decimals and their unit."""
UNITS = {"mm": "mm", "pixel": "px"}
OVERLAY_ORDER = ("best", "median", "worst")
Z95 = 1.959963984540054
AXES = ("dataset", "backbone", "weights", "method", "shots")
"""Row columns of their own; any other option that differs between records gets an
``options`` entry (see ``runner.identity.flat_options``)."""


def _shots_order(shots: str) -> float:
    return math.inf if shots == "all" else float(shots)


def _usable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Successful records that carry what a row needs; others are logged and left out."""
    keep = []
    for rec in records:
        if rec.get("failed"):
            continue
        needed = ("config", "dataset", "backbone", "metrics", "run", "labels_used", "timings")
        missing = [k for k in needed if k not in rec]
        if missing:
            log.warning("record %s lacks %s; left out of the report", rec.get("_path"), missing)
            continue
        keep.append(rec)
    return keep


def varying_options(records: list[dict[str, Any]]) -> list[str]:
    """Options (other than the table's own axes) whose value differs between records of the
    same method: the ones a reader needs to tell rows apart."""
    from clinadapt.runner.identity import flat_options

    values: dict[tuple[str, str], set[Any]] = defaultdict(set)
    for rec in records:
        method = rec["config"]["method"]
        for key, value in flat_options(rec["run"]["options"]).items():
            if key in AXES:
                continue
            values[(method if key.startswith(("method.", "train.")) else "", key)].add(value)
    return sorted({key for (_, key), seen in values.items() if len(seen) > 1})


def interval(values: list[float], cis: list[list[float]], upper: float = 1.0) -> list[float] | None:
    """A 95% interval for one new run (new seed, new test sample): mean ± 1.96 x sqrt(between-seed
    variance + mean within-seed bootstrap variance), the law of total variance under a normal
    approximation; each bootstrap variance is read from its percentile CI's width / 3.92.
    Clipped to [0, ``upper``], the metric's range (distances have none above)."""
    if not cis:
        return None
    mean = float(np.mean(values))
    between = float(np.var(values, ddof=1)) if len(values) > 1 else 0.0
    within = float(np.mean([((hi - lo) / (2 * Z95)) ** 2 for lo, hi in cis]))
    half = Z95 * math.sqrt(between + within)
    return [max(mean - half, 0.0), min(mean + half, upper)]


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: mean and standard deviation over seeds of each metric, an
    interval that includes seed variation, and the labelled images and time a run took."""
    from clinadapt.runner.identity import flat_options

    records = _usable(records)
    shown = varying_options(records)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        flat = flat_options(rec["run"]["options"])
        cfg = rec["config"]
        key = (
            record_task(rec).name,
            rec["dataset"]["name"],
            cfg["backbone"],
            cfg["weights"],
            bool(rec["backbone"]["is_pretrained"]),
            cfg["method"],
            str(cfg["shots"]),
            tuple((k, flat[k]) for k in shown if k in flat),
        )
        groups[key].append(rec)
    rows = []
    for key, recs in groups.items():
        task, dataset, backbone, weights, pretrained, method, shots, options = key
        row: dict[str, Any] = {
            "task": task,
            "dataset": dataset,
            "backbone": backbone,
            "weights": weights,
            "pretrained": pretrained,
            "method": method,
            "shots": shots,
            "options": ", ".join(f"{k}={_text(v)}" for k, v in options),
            "text": text_summary(recs[0].get("text")) if recs[0].get("text") else "",
            "seeds": len(recs),
        }
        for metric in record_task(recs[0]).report_metrics:
            _summarise_metric(row, metric, recs)
        row["verified"] = recs[0]["dataset"]["provenance"].get("verified")
        row["protocol"] = _protocol(recs[0])
        test = recs[0]["metrics"]["test"]
        if "distance_unit" in test:
            row["distance_unit"] = test["distance_unit"]
            row["nsd_tolerance"] = test.get("nsd_tolerance")
        _overlay_sources(row, recs)
        _calibration(row, recs)
        row["labels_used"] = float(np.mean([r["labels_used"]["total"] for r in recs]))
        row["time_s"] = float(np.mean([r["timings"]["run_s"] for r in recs]))
        row["fitted_parameters"] = recs[0]["method"]["fitted_parameters"]
        rows.append(row)
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["backbone"],
            not r["pretrained"],
            r["weights"],
            r["method"],
            _shots_order(r["shots"]),
            r["options"],
        )
    )
    return rows


def _protocol(rec: dict[str, Any]) -> str:
    """How inputs reached the network: resize mode and sizes; for dense tasks, where image and
    mask are brought to one size together, the mode and that size, and whether volumes went
    through slice by slice."""
    pre = rec["preprocessing"]
    if record_task(rec).dense_targets:
        size = pre.get("size")
        size = "x".join(map(str, size)) if isinstance(size, list) else size
        return f"{pre.get('resize')} to {size}" + (", axial slices" if pre.get("slices") else "")
    text = f"{pre.get('resize')} {pre.get('source_size')}->{pre.get('input_size')}"
    if pre.get("volume_mode"):
        text += f", {pre['volume_mode']} slices ({pre.get('max_slices') or 'all'})"
    return text


def _run_folder(record_path: str) -> Path:
    """Where a run's own files lie: beside a ``record.json``, or in the folder a bench record
    ``X.json`` names (``X``)."""
    path = Path(record_path)
    return path.parent if path.name == "record.json" else path.with_suffix("")


def _overlay_sources(row: dict[str, Any], recs: list[dict[str, Any]]) -> None:
    """The pictures of the row's first seed (``overlays``: which -> file) and that seed."""
    first = min(recs, key=lambda r: r["config"].get("seed", 0))
    pictures = first.get("overlays")
    if not pictures:
        return
    if "_path" not in first:
        log.warning("record of %s has overlays but no file path; left out", _row_title(row))
        return
    folder = _run_folder(first["_path"])
    order = [w for w in OVERLAY_ORDER if w in pictures] + sorted(set(pictures) - {*OVERLAY_ORDER})
    row["overlays"] = {which: folder / pictures[which] for which in order}
    row["overlays_seed"] = first["config"].get("seed")


def _calibration(row: dict[str, Any], recs: list[dict[str, Any]]) -> None:
    """Test ECE before and after temperature scaling (mean over the seeds that have it), and the
    first seed's reliability diagram."""
    blocks = [r["calibration"] for r in recs if r.get("calibration")]
    if not blocks:
        return
    for which in ("before", "after"):
        values = [b["test"][which]["ece"] for b in blocks if which in b["test"]]
        if values:
            row[f"ece_{which}"] = float(np.mean(values))
            row[f"ece_{which}_n"] = len(values)
    first = min(recs, key=lambda r: r["config"].get("seed", 0))
    diagram = (first.get("calibration") or {}).get("diagram")
    if diagram and "_path" in first:
        row["reliability"] = {"reliability": _run_folder(first["_path"]) / diagram}
        row["reliability_seed"] = first["config"].get("seed")


def _summarise_metric(row: dict[str, Any], metric: str, recs: list[dict[str, Any]]) -> None:
    """Mean, sd over seeds, the seed-inclusive interval, why a metric is undefined, and for
    tasks scored per case the mean number per seed of test cases where it is undefined."""
    values, cis, reasons, undefined_cases = [], [], set(), []
    for rec in recs:
        test = rec["metrics"]["test"]
        if "n_undefined" in test:
            undefined_cases.append((test["n_undefined"].get(metric, 0), test["n_cases"]))
        value = test.get(metric)
        if value is None or math.isnan(value):
            why = test.get("undefined", {})
            # per-case tasks name the summary statistic: "mean_fg_<metric>.mean"
            reasons.add(why.get(metric) or why.get(f"mean_fg_{metric}.mean") or "undefined")
            continue
        values.append(value)
        ci = rec["metrics"].get("test_ci95", {}).get(metric)
        if ci and None not in ci:
            cis.append(ci)
    row[metric] = float(np.mean(values)) if values else math.nan
    row[f"{metric}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    upper = math.inf if metric in DISTANCE_METRICS else 1.0
    row[f"{metric}_ci"] = interval(values, cis, upper) if len(cis) == len(values) else None
    row[f"{metric}_n"] = len(values)
    row[f"{metric}_undefined"] = "; ".join(sorted(reasons))
    if undefined_cases:
        row[f"{metric}_cases_undefined"] = float(np.mean([n for n, _ in undefined_cases]))
        row[f"{metric}_cases"] = float(np.mean([n for _, n in undefined_cases]))


def setup_time(records: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of shared work (loading, feature extraction), counted once per setup, and of the
    runs' own work; their sum is what the records cost."""
    usable = _usable(records)
    setups = {r["timings"]["setup_key"]: r["timings"]["setup_s"] for r in usable}
    runs = sum(r["timings"]["run_s"] for r in usable)
    return {"setup_s": float(sum(setups.values())), "setups": len(setups), "runs_s": float(runs)}


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)


def _count(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def _fmt(row: dict[str, Any], metric: str) -> str:
    mean = row[metric]
    why = row.get(f"{metric}_undefined")
    if math.isnan(mean):
        return f"n/a ({why})" if why else "n/a"
    digits = 2 if metric in DISTANCE_METRICS else 3
    text = f"{mean:.{digits}f} ± {row[f'{metric}_sd']:.{digits}f}"
    ci = row.get(f"{metric}_ci")
    text = f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else text
    if metric in DISTANCE_METRICS and row.get("distance_unit"):
        text += f" {UNITS.get(row['distance_unit'], row['distance_unit'])}"
    if why:  # some seeds gave no value
        text += f" ({row['seeds'] - row[f'{metric}_n']} of {row['seeds']} seeds n/a: {why})"
    cases = row.get(f"{metric}_cases_undefined")
    if cases:  # some test cases gave no value; the mean is over the others
        per_seed = f", mean over {row['seeds']} seeds" if row["seeds"] > 1 else ""
        text += f" ({_count(cases)}/{_count(row[f'{metric}_cases'])} cases undefined{per_seed})"
    return text


def _weights_label(row: dict[str, Any]) -> str:
    """'pretrained', a local weights folder's name, or 'none (untrained control)'."""
    name = (
        Path(row["weights"]).name
        if row["weights"] not in ("pretrained", "none")
        else row["weights"]
    )
    return name if row["pretrained"] else f"{name} (untrained control)"


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The report metrics of the rows' tasks, in order (classification's when there are none)."""
    from clinadapt.tasks import TASKS

    tasks = dict.fromkeys(r["task"] for r in rows) or {"classification": None}
    return list(dict.fromkeys(m for t in tasks for m in TASKS.get(t).report_metrics))


CALIBRATION_COLUMNS = {"ece_before": "ECE", "ece_after": "ECE after T"}
"""Test ECE of the run's outputs, and after temperature scaling fitted on the validation labels
the run used (runs that used none have no value: '-')."""


def calibration_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The calibration values some row has, in order."""
    return [key for key in CALIBRATION_COLUMNS if any(key in r for r in rows)]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    metrics = [METRIC_LABELS.get(m, m) for m in metric_columns(rows)]
    metrics += [CALIBRATION_COLUMNS[key] for key in calibration_columns(rows)]
    before = ["dataset", "backbone", "weights", "method", "shots", "options", "text", "seeds"]
    return [*before, "labelled images", *metrics, "protocol", "trained params", "run time (s)"]


OPTIONAL_COLUMNS = ("options", "text")
"""Shown only when some row has one: options that differ, the class text a run used."""


def _shown(column: str, rows: list[dict[str, Any]]) -> bool:
    return column not in OPTIONAL_COLUMNS or any(r.get(column) for r in rows)


def header(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns; ``options`` only when some rows differ in an option, ``text`` only
    when some used class text."""
    return [h for h in _columns(rows) if _shown(h, rows)]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    keep = [_shown(h, rows) for h in _columns(rows)]
    metrics = metric_columns(rows)
    calibration = calibration_columns(rows)
    cells = [
        [
            r["dataset"] + ("" if r["verified"] is not False else " (unverified md5)"),
            r["backbone"],
            _weights_label(r),
            r["method"],
            r["shots"],
            r["options"] or "-",
            r.get("text") or "-",
            str(r["seeds"]),
            f"{r['labels_used']:g}",
            *(_fmt(r, m) if m in r else "-" for m in metrics),
            *(_calibration_cell(r, key) for key in calibration),
            r["protocol"],
            f"{r['fitted_parameters']:,}",
            f"{r['time_s']:.2f}",
        ]
        for r in rows
    ]
    return [[c for c, k in zip(row, keep, strict=True) if k] for row in cells]


def _calibration_cell(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "-"
    seeds, text = row[f"{key}_n"], f"{row[key]:.3f}"
    return text + (f" ({seeds} of {row['seeds']} seeds)" if seeds < row["seeds"] else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = header(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def published_comparison(
    rows: list[dict[str, Any]], published: dict[tuple[str, str], dict[str, float]]
) -> str:
    """Our test AUC/ACC beside a paper's, with the AUC gap (ours minus published); over
    several seeds, our mean ± sd, so that a gap can be read against seed noise."""
    lines = [
        "| dataset | backbone | seeds | AUC (ours) | AUC (paper) | gap | ACC (ours) "
        "| ACC (paper) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ours(row: dict[str, Any], metric: str) -> str:
        spread = f" ± {row[f'{metric}_sd']:.3f}" if row.get("seeds", 1) > 1 else ""
        return f"{row[metric]:.3f}{spread}"

    for row in rows:
        ref = published.get((row["dataset"], row["backbone"]))
        if ref is None or row["shots"] != "all":
            continue
        lines.append(
            f"| {row['dataset']} | {row['backbone']} | {row.get('seeds', 1)} | "
            f"{ours(row, 'auc')} | {ref['auc']:.3f} | {row['auc'] - ref['auc']:+.3f} | "
            f"{ours(row, 'acc')} | {ref['acc']:.3f} |"
        )
    return "\n".join(lines)


def primary_metric(task: str) -> str:
    """What a task's plots show: its first report metric (AUC, Dice)."""
    from clinadapt.tasks import TASKS

    return TASKS.get(task).report_metrics[0]


def _shots_label(task: str) -> str:
    """Classification draws its shots per class; other tasks draw labelled images (cases)."""
    return "labelled examples per class" if task == "classification" else "labelled images"


def _by_metric(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by their task's primary metric, so that no plot mixes metrics on one axis."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[primary_metric(row["task"])].append(row)
    return groups


def _curve_groups(
    rows: list[dict[str, Any]],
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["dataset"], row["backbone"])].append(row)
    return groups


def plot_label_efficiency(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The task's primary metric against labelled examples (per class for classification,
    images for other tasks), one line per method and weights (controls dashed), one plot per
    dataset and backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (task, dataset, backbone), group in _curve_groups(rows).items():
        metric = primary_metric(task)
        shots = sorted({r["shots"] for r in group}, key=_shots_order)
        fig, ax = plt.subplots(figsize=(9, 4))
        lines: dict[tuple[str, str, str, bool], list[dict[str, Any]]] = defaultdict(list)
        for r in group:
            lines[(r["method"], r["options"], r["weights"], r["pretrained"])].append(r)
        for (method, options, _weights, pretrained), pts in sorted(lines.items()):
            pts.sort(key=lambda r: _shots_order(r["shots"]))
            x = [shots.index(p["shots"]) for p in pts]
            y = np.array([p[metric] for p in pts])
            sd = np.array([p[f"{metric}_sd"] for p in pts])
            label = f"{method}{f' ({options})' if options else ''} / {_weights_label(pts[0])}"
            if [p["shots"] for p in pts] == ["0"]:  # zero-shot: a point, and its level across
                (line,) = ax.plot(x, y, "*", markersize=11, label=f"{label} (0-shot)")
                ax.axhline(y[0], color=line.get_color(), lw=0.9, ls=":")
                continue
            (line,) = ax.plot(x, y, "o-" if pretrained else "s--", label=label)
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15)
        ax.set_xticks(range(len(shots)), shots)
        ax.set_xlabel(_shots_label(task))
        ax.set_ylabel(f"test {METRIC_LABELS.get(metric, metric)} (mean ± sd over seeds)")
        ax.set_title(f"{dataset}: {backbone}")
        if metric == "auc":  # chance
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out_dir / f"label_efficiency_{dataset}_{backbone.replace(':', '-')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_pretrained_vs_control(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Bars of the primary metric with all labels, each pretrained backbone beside its untrained
    control; error bars are bootstrap 95% CIs on the test split. One plot per metric:
    ``pretrained_vs_control.png`` for AUC, ``pretrained_vs_control_<metric>.png`` for others."""
    paths = []
    for metric, group in _by_metric(rows).items():
        name = "pretrained_vs_control" + ("" if metric == "auc" else f"_{metric}")
        path = _pretrained_vs_control(group, metric, out_dir / f"{name}.png")
        if path:
            paths.append(path)
    return paths


def _pretrained_vs_control(rows: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["shots"] == "all"]
    if not any(not r["pretrained"] for r in full) or not any(r["pretrained"] for r in full):
        return None
    cats = sorted({(r["dataset"], r["backbone"], r["method"]) for r in full})
    several_backbones = len({c[1] for c in cats}) > 1
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(cats) + 2), 4.5))
    width = 0.4
    for offset, pretrained, name in (
        (-width / 2, True, "pretrained"),
        (width / 2, False, "control"),
    ):
        vals, lows, highs = [], [], []
        for cat in cats:
            match = [
                r
                for r in full
                if (r["dataset"], r["backbone"], r["method"]) == cat
                and r["pretrained"] is pretrained
            ]
            value = match[0][metric] if match else np.nan
            ci = (match[0].get(f"{metric}_ci") if match else None) or [value, value]
            vals.append(value)
            lows.append(max(value - ci[0], 0.0))
            highs.append(max(ci[1] - value, 0.0))
        ax.bar(
            np.arange(len(cats)) + offset,
            vals,
            width,
            yerr=[lows, highs],
            label=name,
            capsize=2,
            error_kw={"elinewidth": 0.8},
        )
    labels = [f"{d} / {m}" + (f"\n{b}" if several_backbones else "") for d, b, m in cats]
    ax.set_xticks(range(len(cats)), labels, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(f"test {METRIC_LABELS.get(metric, metric)}, all labels (95% bootstrap CI)")
    if metric == "auc":  # chance, and the range where AUCs differ
        ax.set_ylim(0.4, 1.0)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend()
    ax.set_title("pretrained weights versus untrained control")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_metric_vs_parameters(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """What each extra trainable parameter buys: the primary metric against fitted/trainable
    parameters, one plot per metric (``auc_vs_parameters.png``, ``dice_vs_parameters.png``),
    drawn where at least two methods train parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, group in _by_metric(rows).items():
        pts = [r for r in group if r["fitted_parameters"] > 0 and not math.isnan(r[metric])]
        if len({r["method"] for r in pts}) < 2:
            continue
        label = METRIC_LABELS.get(metric, metric)
        datasets = sorted({r["dataset"] for r in pts})
        fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
        for ax, dataset in zip(axes[0], datasets, strict=True):
            for r in (r for r in pts if r["dataset"] == dataset):
                marker = "o" if r["shots"] == "all" else "^"
                ax.errorbar(
                    r["fitted_parameters"],
                    r[metric],
                    yerr=r[f"{metric}_sd"],
                    fmt=marker,
                    capsize=2,
                    color="C0" if r["pretrained"] else "C1",
                )
                ax.annotate(
                    f"{r['method']} ({r['shots']})",
                    (r["fitted_parameters"], r[metric]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            ax.set_xscale("log")
            ax.set_xlabel("trained parameters (log)")
            ax.set_ylabel(f"test {label} (mean ± sd over seeds)")
            ax.set_title(f"{dataset}: {label} against trainable parameters", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_parameters.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _row_title(row: dict[str, Any]) -> str:
    options = f" ({row['options']})" if row["options"] else ""
    shots = "all labels" if row["shots"] == "all" else f"{row['shots']} shots"
    return (
        f"{row['dataset']} / {row['backbone']} / {_weights_label(row)} / {row['method']}"
        f"{options} / {shots}"
    )


def copy_overlays(rows: list[dict[str, Any]], out: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """Copy each row's overlay pictures (its first seed's) into ``out/overlays`` so that the
    report stands alone; returns (heading, [(which, path relative to ``out``)]) per row with
    pictures. A picture that cannot be read is left out with a warning."""
    return [
        (f"{title} (seed {seed}): {', '.join(w for w, _ in pictures)} test case", pictures)
        for title, seed, pictures in _copy_pictures(rows, out, "overlays")
    ]


def copy_reliability(
    rows: list[dict[str, Any]], out: Path
) -> list[tuple[str, list[tuple[str, str]]]]:
    """Copy each row's reliability diagram (its first seed's) into ``out/reliability``, as
    ``copy_overlays`` does its pictures."""
    return [
        (f"{title} (seed {seed})", pictures)
        for title, seed, pictures in _copy_pictures(rows, out, "reliability")
    ]


def _copy_pictures(
    rows: list[dict[str, Any]], out: Path, key: str
) -> list[tuple[str, Any, list[tuple[str, str]]]]:
    """(row title, seed, [(which, copied path relative to ``out``)]) of the rows' ``key``
    pictures, copied into ``out/key``."""
    sections, used = [], set()
    for row in rows:
        if not row.get(key):
            continue
        title = _row_title(row)
        base = "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-") for p in title.split(" / "))
        slug, n = base, 1
        while slug in used:  # titles that differ only in characters a file name drops
            n += 1
            slug = f"{base}-{n}"
        used.add(slug)
        pictures = []
        for which, source in row[key].items():
            target = out / key / f"{slug}_{which}{Path(source).suffix}"
            try:
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, target)
            except OSError as err:
                log.warning("%s picture of %s left out of the report: %s", which, title, err)
                continue
            pictures.append((which, target.relative_to(out).as_posix()))
        if pictures:
            sections.append((title, row[f"{key}_seed"], pictures))
    return sections


def failures(records: list[dict[str, Any]]) -> list[str]:
    return [
        f"{'/'.join(Path(r['_path']).parts[-2:])}: {r['error']}" for r in records if r.get("failed")
    ]


def notes(rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    """What a reader needs to read the table: how cells are made, what each task's metrics
    mean (only for the tasks present), and what time was spent."""
    from clinadapt.runner.identity import flat_options

    spent = setup_time(records)
    tasks = {r["task"] for r in rows} or {"classification"}
    out = [
        "Metrics: test split, mean ± sd over seeds, [95% interval for one run: seed variation"
        " and bootstrap resampling of the test set together, see runner.report.interval].",
        "Labelled images: training examples plus the validation examples that chose"
        " hyper-parameters or the epoch (mean over seeds).",
        "Run time: each run's own work. Loading and feature extraction, shared by runs, took"
        f" {spent['setup_s']:.1f} s over {spent['setups']} setups;"
        f" the runs {spent['runs_s']:.1f} s.",
    ]
    if "classification" in tasks:
        out.append(
            "AUC and ACC follow the MedMNIST evaluator (macro one-vs-rest AUC; 0.5 threshold)."
        )
    if any("ece_before" in r for r in rows):
        out.append(
            "ECE: expected calibration error of the test outputs (15 equal-width confidence"
            " bins), mean over seeds; 'ECE after T' after temperature scaling fitted on the"
            " validation labels the run used ('-' where it used none: no labels are added)."
        )
    if any(
        flat_options(r["run"]["options"])["tta"] != "none"
        or flat_options(r["run"]["options"])["adaptive_temperature"] != "off"
        for r in _usable(records)
    ):
        out.append(
            "tta: test-time adaptation of the model on the unlabelled test batches at evaluation;"
            " adaptive_temperature: the adaptive-temperature softmax at inference (a no-op on"
            " binary outputs). Each record's tta block counts the examples adapted and filtered,"
            " resets and collapses, and the seconds per image."
        )
    if any(r.get("text") for r in rows):
        out.append(
            "text: the class text of a vision-language run: the phrases in the templates (names,"
            " descriptions or both) x the number of templates; the text encoder; where the text"
            " came from. Rows at shots 0 (zero-shot) use no labelled image; the label-efficiency"
            " plots draw them as a star at 0 with a dotted line at their level."
        )
    if "segmentation" in tasks:
        out.append(_segmentation_note([r for r in rows if r["task"] == "segmentation"]))
    prompted = sorted(
        {r["config"]["method"] for r in _usable(records) if r.get("kind") == "prompted"}
    )
    if prompted:
        out.append(
            f"{', '.join(prompted)}: zero-shot promptable segmentation with oracle prompts, boxes"
            " and points drawn from each test case's ground truth (see each record's 'prompts'):"
            " what the model does given the objects' true extent, an upper bound for prompts a"
            " user would draw; they use no labelled training images."
        )
    out += [
        "Rows marked 'untrained control' use randomly initialised weights: they are a baseline,"
        " not a foundation model.",
        "Numbers are comparable only under the same input protocol (column 'protocol').",
    ]
    if any(r["verified"] is False for r in rows):
        out.append("Datasets marked 'unverified md5' differ from the official release.")
    return out


def _segmentation_note(rows: list[dict[str, Any]]) -> str:
    tolerances: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        unit = {"pixel": "pixels"}.get(row.get("distance_unit"), row.get("distance_unit"))
        tol = row.get("nsd_tolerance")
        text = f"{tol:g} {unit}" if tol is not None and unit else "not recorded"
        if row["dataset"] not in tolerances[text]:
            tolerances[text].append(row["dataset"])
    tolerance = (
        next(iter(tolerances))
        if len(tolerances) == 1
        else "; ".join(f"{t} for {', '.join(d)}" for t, d in sorted(tolerances.items()))
    )
    return (
        "Dice, HD95 and NSD are scored per test case at the case's own size, distances in mm"
        " where the voxel spacing is known and in pixels (px) otherwise (NSD tolerance:"
        f" {tolerance}); each cell is the mean over cases of the mean over foreground classes."
        " HD95: lower is better. Empty masks as in clinadapt.eval.segmentation: a class absent"
        " from both truth and prediction scores Dice = NSD = 1 and HD95 = 0; absent from exactly"
        " one, Dice = NSD = 0 and HD95 is undefined, and so is the case's mean over classes."
        " Undefined cases are left out of the mean"
        " and counted in the cell as '(k/N cases undefined)', k the mean number per seed."
    )


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.html, PNG plots and copies of the overlay pictures and reliability
    diagrams; return the paths of the reports and plots."""
    from clinadapt.errors import ClinadaptError

    records = read_records(run_dir)
    if not records:
        raise ClinadaptError(f"no run records found under {run_dir}; run `clinadapt bench` first")
    out = Path(out_dir) if out_dir else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(records)
    plots = [
        *plot_label_efficiency(rows, out),
        *plot_pretrained_vs_control(rows, out),
        *plot_metric_vs_parameters(rows, out),
    ]
    galleries = [
        (title, sections)
        for title, sections in (
            ("Best, median and worst test cases", copy_overlays(rows, out)),
            ("Reliability diagrams (test split)", copy_reliability(rows, out)),
        )
        if sections
    ]
    text = notes(rows, records)
    fails = failures(records)
    md = ["# clinadapt report", "", *[f"- {n}" for n in text], "", markdown_table(rows), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    for heading, sections in galleries:
        md += ["", f"## {heading}"]
        for title, pictures in sections:
            md += ["", f"### {title}", "", " ".join(f"![{w}]({p})" for w, p in pictures)]
    if fails:
        md += ["", "## Failed runs", "", *[f"- {f}" for f in fails]]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    html_path = out / "report.html"
    html_path.write_text(_html(rows, text, plots, galleries, fails))
    return {"markdown": md_path, "html": html_path, **{p.stem: p for p in plots}}


def _html(
    rows: list[dict[str, Any]],
    notes: list[str],
    plots: list[Path],
    galleries: list[tuple[str, list[tuple[str, list[tuple[str, str]]]]]],
    fails: list[str],
) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header(rows))
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
        for cells in table_rows(rows)
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>clinadapt report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head><body>",
        "<h1>clinadapt report</h1><ul>",
        *[f"<li>{esc(n)}</li>" for n in notes],
        f"</ul><table><tr>{head}</tr>{body}</table>",
        *[f"<p><img src='{esc(p.name)}' alt='{esc(p.stem)}'></p>" for p in plots],
    ]
    for heading, sections in galleries:
        parts.append(f"<h2>{esc(heading)}</h2>")
        for title, pictures in sections:
            images = "".join(f"<img src='{esc(p)}' alt='{esc(w)}'>" for w, p in pictures)
            parts += [f"<h3>{esc(title)}</h3>", f"<p>{images}</p>"]
    if fails:
        parts += ["<h2>Failed runs</h2><ul>", *[f"<li>{esc(f)}</li>" for f in fails], "</ul>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)
