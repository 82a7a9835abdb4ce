"""Per-epoch history written for people: ``history.json`` (NaN as null) and ``curves.png``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

CURVES = (
    ("loss", ("train_loss", "val_loss")),
    ("validation metrics", ("val_auc", "val_acc", "val_balanced_accuracy")),
    ("learning rate", ("lr",)),
)


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    """Atomic write, so a reader never sees half a file while training goes on."""

    def plain(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    rows = [{k: plain(v) for k, v in row.items()} for row in history]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


Panels = tuple[tuple[str, tuple[str, ...]], ...]


def plot_curves(history: list[dict[str, Any]], path: Path, panels: Panels = CURVES) -> None:
    """One panel per (title, history keys) against epochs; by default loss, validation
    metrics and learning rate (no pyplot global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    for ax, (title, keys) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
