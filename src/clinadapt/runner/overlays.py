"""Pictures of a segmentation run's cases for people to look at: which cases to show (best,
median, worst) and each one as its image, ground truth and prediction side by side."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.errors import ConfigError, DataError
from clinadapt.eval.segmentation import check_labels
from clinadapt.runner.masks import check_num_classes, output_path
from clinadapt.runner.records import write_bytes_atomic

LOWER_IS_BETTER = ("hd95",)  # distances; every other segmentation metric is better higher
PERCENTILES = (1, 99)  # display range of images that are not 8-bit
FILL_ALPHA = 0.4
PANELS = ("image", "ground truth", "prediction")
PANEL_INCHES = 4.0  # width of one panel, at 100 dpi
BOX_COLOUR = "#ffd400"
POINT_STYLES = {1: ("+", "#00e05a", "foreground point"), 0: ("x", "#ff3030", "background point")}
OVERLAY_METRIC = "mean_fg_dice"


def pick_cases(cases: list[dict[str, Any]], metric: str = "mean_fg_dice") -> dict[str, int]:
    """Indices into ``cases`` of the ``best``, ``median`` and ``worst`` case by ``metric``
    (higher is better, except for the distance hd95). Undefined values (NaN, or None as records
    store NaN) rank below every defined one, so a missed structure shows as the worst; ties go
    to the lower index; the median is the case at position (n - 1) // 2 of that order."""
    if not cases:
        raise DataError("no cases to pick from: the test split has no cases")
    missing = next((i for i, case in enumerate(cases) if metric not in case), None)
    if missing is not None:
        raise ConfigError(
            f"case {missing} ({cases[missing].get('id', 'no id')}) has no metric {metric!r}; "
            f"pick by one of its metrics: {sorted(cases[missing])}"
        )
    sign = 1.0 if metric.removeprefix("mean_fg_").split("_")[0] in LOWER_IS_BETTER else -1.0

    def rank(i: int) -> tuple[bool, float, int]:
        value = cases[i][metric]
        value = math.nan if value is None else float(value)
        undefined = math.isnan(value)
        return undefined, 0.0 if undefined else sign * value, i

    order = sorted(range(len(cases)), key=rank)
    return {"best": order[0], "median": order[(len(order) - 1) // 2], "worst": order[-1]}


def case_overlays(
    run_dir: Path, split: Any, predictions: Sequence[np.ndarray], cases: list[dict], info: Any
) -> dict[str, str]:
    """Pictures of a run's best, median and worst test case by mean foreground Dice, in
    ``run_dir/overlays``; returns which -> file relative to ``run_dir`` (the record's
    ``overlays``)."""
    out = {}
    for which, i in pick_cases(cases, OVERLAY_METRIC).items():
        value = cases[i][OVERLAY_METRIC]
        path = overlay_png(
            np.asarray(split.images[i]),
            np.asarray(split.labels[i]),
            predictions[i],
            run_dir / "overlays" / f"{which}.png",
            title=f"{which}: {cases[i]['id']} (Dice {value:.3f})",
            num_classes=info.num_classes,
            labels=info.labels,
        )
        out[which] = str(path.relative_to(run_dir))
    return out


def pick_slice(truth: np.ndarray, pred: np.ndarray) -> int:
    """The axial slice (axis 0) of a (D, H, W) case to show: the one with the most ground-truth
    foreground, else the one with the most predicted foreground, else the middle one (D // 2);
    ties go to the first."""
    for mask in (truth, pred):
        counts = (np.asarray(mask) > 0).reshape(len(mask), -1).sum(axis=1)
        if counts.any():
            return int(counts.argmax())
    return len(truth) // 2


def overlay_png(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray,
    path: Path,
    *,
    title: str,
    num_classes: int,
    labels: Sequence[str] | None = None,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
) -> Path:
    """One PNG with three panels: the image, the image with the ground truth and the image with
    the prediction, each foreground class a semi-transparent fill with its contour in its own
    colour, named in a legend (``labels``: the dataset's class names, background first; else
    "class k"). Returns the path written (``.png`` added when ``path`` has no suffix).

    ``image`` is (H, W) or (H, W, 3) for 2D masks (H, W), or (D, H, W) for 3D masks (D, H, W),
    which show the slice ``pick_slice`` chooses, its index in the panel titles. uint8 images are
    shown as stored; others scaled to their 1st-99th percentiles. Written atomically.

    Without a ground truth (``truth`` None) there are two panels, image and prediction. Prompts
    of a 2D case are drawn on every panel: ``boxes`` as ``x0, y0, x1, y1`` and ``points`` as
    ``x, y, label`` (1 foreground, 0 background), in pixels (x along columns).
    """
    k = check_num_classes(num_classes)
    names = _class_names(labels, k)
    path = output_path(path, ".png")
    img, p = np.asarray(image), np.asarray(pred)
    t = None if truth is None else np.asarray(truth)
    _check_shapes(img, p if t is None else t, p, path)
    p = check_labels(f"the prediction for {path}", p, k)
    t = None if t is None else check_labels(f"the ground truth for {path}", t, k)
    if p.ndim == 3 and (len(boxes) or len(points)):
        raise ConfigError(f"{path}: prompts are drawn on 2D overlays; pass the slice they are on")
    shown = _display(img, path)
    where = ""
    if p.ndim == 3:
        z = pick_slice(p if t is None else t, p)
        where = f", slice {z} of {len(p)}"
        shown, p = shown[z], p[z]
        t = None if t is None else t[z]
    panels = dict(zip(PANELS, (None, t, p), strict=True))
    if t is None:
        del panels["ground truth"]

    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cmap = colormaps["tab10" if k <= 11 else "tab20"]
    colours = [cmap(c % cmap.N)[:3] for c in range(k - 1)]  # colours[c - 1] is class c's
    h, w = p.shape
    height = min(max(PANEL_INCHES * h / w, 1.0), 3 * PANEL_INCHES) + 1.1  # + title and legend
    fig = Figure(figsize=(len(panels) * PANEL_INCHES + 0.3, height))
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.45 / height, top=1 - 0.65 / height, wspace=0.04
    )
    for ax, (panel, mask) in zip(fig.subplots(1, len(panels)), panels.items(), strict=True):
        ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if mask is not None:
            _draw_mask(ax, mask, colours)
        prompt_handles = _draw_prompts(ax, boxes, points)
        ax.set_title(panel + where)
        ax.set_axis_off()
    fig.suptitle(title)
    handles = [Patch(color=colours[c - 1], label=f"{c}: {names[c]}") for c in range(1, k)]
    handles += prompt_handles
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _class_names(labels: Sequence[str] | None, k: int) -> list[str]:
    if labels is None:
        return ["background", *(f"class {c}" for c in range(1, k))]
    if isinstance(labels, str) or len(labels) != k:
        raise ConfigError(
            f"labels must name all {k} classes, background first, got {labels!r}; pass the "
            "dataset's labels or none"
        )
    return [str(name) for name in labels]


def _check_shapes(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: Path) -> None:
    if truth.shape != pred.shape:
        raise DataError(
            f"{path}: the prediction has shape {pred.shape} but the ground truth {truth.shape}; "
            "restore the prediction to the case's size first"
        )
    if truth.ndim not in (2, 3) or truth.size == 0:
        raise DataError(
            f"{path}: masks must be non-empty 2D (H, W) or 3D (D, H, W), got {truth.shape}"
        )
    shapes = [truth.shape] + ([(*truth.shape, 3)] if truth.ndim == 2 else [])
    if image.shape not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise DataError(
            f"{path}: the image has shape {image.shape} but its masks {truth.shape}; expected "
            f"an image of shape {expected} (channels last)"
        )


def _display(image: np.ndarray, path: Path) -> np.ndarray:
    """float in [0, 1]: uint8 as stored, anything else between its 1st and 99th percentile
    (its minimum and maximum when those are equal)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255
    if image.dtype != bool and not np.issubdtype(image.dtype, np.number):
        raise DataError(f"{path}: the image must be numeric, got dtype {image.dtype}")
    a = image.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{path}: the image holds NaN or infinite values")
    lo, hi = np.percentile(a, PERCENTILES)
    if hi <= lo:
        lo, hi = a.min(), a.max()
    if hi <= lo:
        return np.zeros_like(a, dtype=np.float32)
    return ((np.clip(a, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _draw_prompts(
    ax: Any, boxes: Sequence[Sequence[float]], points: Sequence[Sequence[float]]
) -> list[Any]:
    """Boxes as outlines, points as markers (+ foreground, x background); the legend's entries
    for what was drawn."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    handles: list[Any] = []
    limits = ax.get_xlim(), ax.get_ylim()  # markers must not widen the view
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR, linewidth=1.5)
        )
    if len(boxes):
        handles.append(Line2D([], [], color=BOX_COLOUR, linewidth=1.5, label="box prompt"))
    for label, (marker, colour, name) in POINT_STYLES.items():
        xy = [(x, y) for x, y, lab in points if int(lab) == label]
        if xy:
            style = {"marker": marker, "color": colour, "markersize": 9, "markeredgewidth": 2.5}
            ax.plot(*zip(*xy, strict=True), linestyle="none", **style)
            handles.append(Line2D([], [], linestyle="none", label=name, **style))
    ax.set_xlim(limits[0])
    ax.set_ylim(limits[1])
    return handles


def _draw_mask(ax: Any, mask: np.ndarray, colours: list[tuple[float, ...]]) -> None:
    """Fills and contours; each class is padded with background so regions at the border get
    closed contours, drawn on pixel edges."""
    h, w = mask.shape
    fill = np.zeros((h, w, 4))
    xs, ys = np.arange(-1, w + 1), np.arange(-1, h + 1)
    for c in np.unique(mask[mask > 0]):
        region = mask == c
        fill[region] = (*colours[c - 1], FILL_ALPHA)
        ax.contour(
            xs,
            ys,
            np.pad(region, 1).astype(np.float32),
            levels=[0.5],
            colors=[colours[c - 1]],
            linewidths=1.5,
        )
    ax.imshow(fill, interpolation="nearest")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
