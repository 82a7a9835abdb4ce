"""Markdown/HTML reports and PNG plots built only from run records."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.runner.records import read_records

METRICS = ("auc", "acc", "balanced_accuracy")


@dataclass(frozen=True)
class RowKey:
    dataset: str
    backbone: str
    weights: str
    pretrained: bool
    method: str
    shots: str


def _shots_order(shots: str) -> float:
    return math.inf if shots == "all" else float(shots)


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: mean and standard deviation over seeds of each metric."""
    groups: dict[RowKey, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        if rec.get("failed"):
            continue
        cfg = rec["config"]
        key = RowKey(
            dataset=rec["dataset"]["name"],
            backbone=cfg["backbone"],
            weights=cfg["weights"],
            pretrained=bool(rec["backbone"]["is_pretrained"]),
            method=cfg["method"],
            shots=str(cfg["shots"]),
        )
        groups[key].append(rec)
    rows = []
    for key, recs in groups.items():
        row: dict[str, Any] = {**key.__dict__, "seeds": len(recs)}
        for metric in METRICS:
            values = [r["metrics"]["test"].get(metric) for r in recs]
            values = [v for v in values if v is not None and not math.isnan(v)]
            row[metric] = float(np.mean(values)) if values else math.nan
            row[f"{metric}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            cis = [r["metrics"].get("test_ci95", {}).get(metric) for r in recs]
            cis = [c for c in cis if c and None not in c]
            row[f"{metric}_ci"] = (
                [float(np.mean([c[0] for c in cis])), float(np.mean([c[1] for c in cis]))]
                if cis
                else None
            )
        row["verified"] = recs[0]["dataset"]["provenance"].get("verified")
        pre = recs[0]["preprocessing"]
        row["protocol"] = f"{pre.get('resize')} {pre.get('source_size')}->{pre.get('input_size')}"
        if pre.get("volume_mode"):
            row["protocol"] += f", {pre['volume_mode']} slices ({pre.get('max_slices') or 'all'})"
        row["time_s"] = float(np.mean([_total_seconds(r["timings"]) for r in recs]))
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
        )
    )
    return rows


def _total_seconds(timings: dict[str, float]) -> float:
    """A run's wall time; older records without ``total_s`` add up their parts."""
    if "total_s" in timings:
        return timings["total_s"]
    return sum(v for k, v in timings.items() if k.endswith("_s") and k != "time_per_epoch_s")


def _fmt(row: dict[str, Any], metric: str) -> str:
    mean = row[metric]
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:.3f} ± {row[f'{metric}_sd']:.3f}"
    ci = row.get(f"{metric}_ci")
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


def _weights_label(row: dict[str, Any]) -> str:
    """'pretrained', a local weights folder's name, or 'none (untrained control)'."""
    name = (
        Path(row["weights"]).name
        if row["weights"] not in ("pretrained", "none")
        else row["weights"]
    )
    return name if row["pretrained"] else f"{name} (untrained control)"


HEADER = [
    "dataset",
    "backbone",
    "weights",
    "method",
    "shots",
    "seeds",
    "AUC",
    "ACC",
    "balanced acc.",
    "protocol",
    "trained params",
    "time (s)",
]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["dataset"] + ("" if r["verified"] is not False else " (unverified md5)"),
            r["backbone"],
            _weights_label(r),
            r["method"],
            r["shots"],
            str(r["seeds"]),
            _fmt(r, "auc"),
            _fmt(r, "acc"),
            _fmt(r, "balanced_accuracy"),
            r["protocol"],
            f"{r['fitted_parameters']:,}",
            f"{r['time_s']:.1f}",
        ]
        for r in rows
    ]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def published_comparison(
    rows: list[dict[str, Any]], published: dict[tuple[str, str], dict[str, float]]
) -> str:
    """Our test AUC/ACC beside a paper's, with the AUC gap (ours minus published)."""
    lines = [
        "| dataset | backbone | AUC (ours) | AUC (paper) | gap | ACC (ours) | ACC (paper) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = published.get((row["dataset"], row["backbone"]))
        if ref is None or row["shots"] != "all":
            continue
        lines.append(
            f"| {row['dataset']} | {row['backbone']} | {row['auc']:.3f} | {ref['auc']:.3f} | "
            f"{row['auc'] - ref['auc']:+.3f} | {row['acc']:.3f} | {ref['acc']:.3f} |"
        )
    return "\n".join(lines)


def _curve_groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["backbone"])].append(row)
    return groups


def plot_label_efficiency(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """AUC against shots per class, one line per method and weights (controls dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (dataset, backbone), group in _curve_groups(rows).items():
        shots = sorted({r["shots"] for r in group}, key=_shots_order)
        fig, ax = plt.subplots(figsize=(9, 4))
        lines: dict[tuple[str, str, bool], list[dict[str, Any]]] = defaultdict(list)
        for r in group:
            lines[(r["method"], r["weights"], r["pretrained"])].append(r)
        for (method, _weights, pretrained), pts in sorted(lines.items()):
            pts.sort(key=lambda r: _shots_order(r["shots"]))
            x = [shots.index(p["shots"]) for p in pts]
            y = np.array([p["auc"] for p in pts])
            sd = np.array([p["auc_sd"] for p in pts])
            label = f"{method} / {_weights_label(pts[0])}"
            (line,) = ax.plot(x, y, "o-" if pretrained else "s--", label=label)
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15)
        ax.set_xticks(range(len(shots)), shots)
        ax.set_xlabel("labelled examples per class")
        ax.set_ylabel("test AUC (mean ± sd over seeds)")
        ax.set_title(f"{dataset}: {backbone}")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out_dir / f"label_efficiency_{dataset}_{backbone.replace(':', '-')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_pretrained_vs_control(rows: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Bars of AUC with all labels, each pretrained backbone beside its untrained control;
    error bars are bootstrap 95% CIs on the test split."""
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
            auc = match[0]["auc"] if match else np.nan
            ci = (match[0].get("auc_ci") if match else None) or [auc, auc]
            vals.append(auc)
            lows.append(max(auc - ci[0], 0.0))
            highs.append(max(ci[1] - auc, 0.0))
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
    ax.set_ylabel("test AUC, all labels (95% bootstrap CI)")
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend()
    ax.set_title("pretrained weights versus untrained control")
    fig.tight_layout()
    path = out_dir / "pretrained_vs_control.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_auc_vs_parameters(rows: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """What each extra trainable parameter buys: AUC against fitted/trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["fitted_parameters"] > 0 and not math.isnan(r["auc"])]
    if len({r["method"] for r in pts}) < 2:
        return None
    datasets = sorted({r["dataset"] for r in pts})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in (r for r in pts if r["dataset"] == dataset):
            marker = "o" if r["shots"] == "all" else "^"
            ax.errorbar(
                r["fitted_parameters"],
                r["auc"],
                yerr=r["auc_sd"],
                fmt=marker,
                capsize=2,
                color="C0" if r["pretrained"] else "C1",
            )
            ax.annotate(
                f"{r['method']} ({r['shots']})",
                (r["fitted_parameters"], r["auc"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters (log)")
        ax.set_ylabel("test AUC (mean ± sd over seeds)")
        ax.set_title(f"{dataset}: AUC against trainable parameters", fontsize=9)
    fig.tight_layout()
    path = out_dir / "auc_vs_parameters.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def failures(records: list[dict[str, Any]]) -> list[str]:
    return [
        f"{'/'.join(Path(r['_path']).parts[-2:])}: {r['error']}" for r in records if r.get("failed")
    ]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.html and PNG plots; return their paths."""
    from clinadapt.errors import ClinadaptError

    records = read_records(run_dir)
    if not records:
        raise ClinadaptError(f"no run records found under {run_dir}; run `clinadapt bench` first")
    out = Path(out_dir) if out_dir else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(records)
    plots = plot_label_efficiency(rows, out)
    for extra in (plot_pretrained_vs_control(rows, out), plot_auc_vs_parameters(rows, out)):
        if extra:
            plots.append(extra)
    notes = [
        "Metrics: test split, mean ± sd over seeds, [bootstrap 95% CI averaged over seeds].",
        "AUC and ACC follow the MedMNIST evaluator (macro one-vs-rest AUC; 0.5 threshold).",
        "Rows marked 'untrained control' use randomly initialised weights: they are a baseline,"
        " not a foundation model.",
        "Numbers are comparable only under the same input protocol (column 'protocol').",
    ]
    if any(r["verified"] is False for r in rows):
        notes.append("Datasets marked 'unverified md5' differ from the official release.")
    fails = failures(records)
    md = ["# clinadapt report", "", *[f"- {n}" for n in notes], "", markdown_table(rows), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    if fails:
        md += ["", "## Failed runs", "", *[f"- {f}" for f in fails]]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    html_path = out / "report.html"
    html_path.write_text(_html(rows, notes, plots, fails))
    return {"markdown": md_path, "html": html_path, **{p.stem: p for p in plots}}


def _html(rows: list[dict[str, Any]], notes: list[str], plots: list[Path], fails: list[str]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
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
    if fails:
        parts += ["<h2>Failed runs</h2><ul>", *[f"<li>{esc(f)}</li>" for f in fails], "</ul>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)
