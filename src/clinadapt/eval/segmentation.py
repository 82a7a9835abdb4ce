"""Segmentation metrics per image or volume, and their summary over a test set.

``case_metrics`` scores one integer label map (0 = background) against its ground truth with
MONAI's implementations (``monai.metrics``): per foreground class ``dice_<k>``, ``iou_<k>``,
``hd95_<k>`` (95th-percentile Hausdorff distance) and ``nsd_<k>`` (normalised surface Dice,
Nikolov et al. 2021), and their means over the foreground classes, ``mean_fg_<metric>``.

Distances are in mm when ``spacing`` (mm per axis, in array order) is given, else in pixels
(voxels); ``distance_unit`` says which, and the NSD tolerance is read in that unit. Surfaces are
the mask's voxels with a face neighbour outside it (image borders count as outside); HD95 is the
larger of the two directed 95th percentiles (prediction to ground truth, ground truth to
prediction), not the percentile of the pooled distances; NSD counts surface voxels within the
tolerance in both directions over all surface voxels (MONAI's ``use_subvoxels=False``, not
DeepMind's surface-element areas).

Empty classes are decided here, not left to MONAI (NaN HD95 for any empty side, NaN NSD for both):

- ground truth and prediction both empty: dice = iou = nsd = 1 and hd95 = 0. The model correctly
  says the structure is absent, which is the answer a reader wants credited; it is MONAI's
  ``ignore_empty=False`` and nnU-Net's convention for Dice, extended to the distance metrics.
- exactly one of them empty: dice = iou = nsd = 0, hd95 = NaN with the reason "empty ground truth
  or prediction" in ``undefined``: no distance exists to one empty surface, and inventing one
  (e.g. the image diagonal) would make HD95 depend on the field of view.

``mean_fg_<metric>`` is NaN, with the classes named in ``undefined``, when any class's value is
NaN, so a missed structure is never averaged away. No value is NaN without a reason in
``undefined``.

``aggregate`` summarises ``case_metrics`` over cases: mean and sd with undefined cases left out
and counted, and percentile-bootstrap 95% intervals over cases (resampled as in
``clinadapt.eval.bootstrap_ci``) for the ``mean_fg_*`` metrics and per-class Dice.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from clinadapt._optional import require
from clinadapt.errors import ConfigError, DataError

METRICS = ("dice", "iou", "hd95", "nsd")
EMPTY_ONE_SIDE = "empty ground truth or prediction"
_CI_PATTERN = re.compile(r"^(mean_fg_\w+|dice_\d+)$")
_UNIT_KEYS = ("distance_unit", "nsd_tolerance")


def check_labels(name: str, a: np.ndarray, num_classes: int) -> np.ndarray:
    """``a`` as int64 class indices in [0, num_classes); a ``DataError`` naming ``name`` for
    anything else (NaN, fractions, out-of-range labels, non-numeric dtypes)."""
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise DataError(f"{name} must be an integer label map, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any():
            raise DataError(f"{name} contains NaN; give an integer label map (0 = background)")
        fractional = a[a != np.round(a)]
        if fractional.size:
            raise DataError(
                f"{name} has non-integer label {fractional.flat[0].item()!r}; give class indices "
                "(argmax the model's scores, round labels read from a float file)"
            )
    outside = a[(a < 0) | (a >= num_classes)]
    if outside.size:
        raise DataError(
            f"{name} has label {outside.flat[0].item()!r} outside [0, {num_classes}); check "
            "num_classes or the mask's labels"
        )
    return a.astype(np.int64)


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    try:
        if isinstance(spacing, str | bytes):
            raise TypeError
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise DataError(
            f"spacing must be mm per axis, e.g. (1.0, 0.8, 0.8), got {spacing!r}"
        ) from None
    if len(values) != ndim:
        raise DataError(
            f"spacing {spacing!r} has {len(values)} values for a {ndim}D image; give one per axis, "
            "in array order"
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise DataError(f"spacing {spacing!r} must be positive finite mm per axis")
    return values


def case_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    *,
    spacing: tuple[float, ...] | None = None,
    nsd_tolerance_mm: float = 1.0,
) -> dict[str, Any]:
    """Metrics of one 2D (H, W) or 3D (D, H, W) predicted label map against its ground truth.

    Returns ``dice_<k>``, ``iou_<k>``, ``hd95_<k>``, ``nsd_<k>`` for each foreground class
    ``k`` in 1..num_classes-1, ``mean_fg_<metric>``, ``distance_unit`` ("mm", or "pixel" when
    ``spacing`` is None), ``nsd_tolerance`` (in that unit) and ``undefined`` (metric -> why it
    is NaN; empty when none is). Raises ``DataError`` for inputs that are not label maps of the
    same shape with labels in [0, num_classes), or a bad ``spacing``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ConfigError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise ConfigError(
            f"num_classes must be at least 2 (background + one class), got {num_classes}"
        )
    tol = nsd_tolerance_mm
    if not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise ConfigError(
            f"nsd_tolerance_mm must be a non-negative number, got {nsd_tolerance_mm!r}"
        )
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape:
        raise DataError(
            f"prediction shape {p.shape} differs from ground truth shape {t.shape}; predict at the "
            "ground truth's size"
        )
    if p.ndim not in (2, 3) or p.size == 0:
        raise DataError(f"label maps must be non-empty 2D (H, W) or 3D (D, H, W), got {p.shape}")
    p = check_labels("prediction", p, num_classes)
    t = check_labels("ground truth", t, num_classes)
    spacing = _check_spacing(spacing, p.ndim)

    require("monai", extra=None, needed_by="segmentation metrics")
    import torch
    from monai.metrics import (
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    def one_hot(a: np.ndarray) -> torch.Tensor:  # (1, C-1, *spatial), background dropped
        channels = torch.nn.functional.one_hot(torch.from_numpy(a), num_classes).movedim(-1, 0)
        return channels[1:][None]

    yp, yt = one_hot(p), one_hot(t)
    spatial = tuple(range(2, yp.ndim))
    has_p, has_t = yp.any(dim=spatial)[0].numpy(), yt.any(dim=spatial)[0].numpy()
    both = np.flatnonzero(has_p & has_t)
    # ignore_empty=False is this module's empty convention for Dice and IoU
    values = {
        "dice": compute_dice(yp, yt, include_background=True, ignore_empty=False)[0].numpy(),
        "iou": compute_iou(yp, yt, include_background=True, ignore_empty=False)[0].numpy(),
        "hd95": np.where(has_p | has_t, np.nan, 0.0),
        "nsd": np.where(has_p | has_t, 0.0, 1.0),
    }
    if len(both):  # MONAI's distances only where both surfaces exist
        sp, st = yp[:, both].float(), yt[:, both].float()
        with warnings.catch_warnings():  # MONAI 1.5-1.6 passes its own deprecated argument
            warnings.filterwarnings("ignore", ".*always_return_as_numpy", FutureWarning)
            values["hd95"][both] = compute_hausdorff_distance(
                sp, st, include_background=True, percentile=95, spacing=spacing
            )[0].numpy()
            values["nsd"][both] = compute_surface_dice(
                sp, st, [float(tol)] * len(both), include_background=True, spacing=spacing
            )[0].numpy()

    out: dict[str, Any] = {}
    undefined: dict[str, str] = {}
    for metric in METRICS:
        per_class = [float(v) for v in values[metric]]
        for k, v in enumerate(per_class, start=1):
            out[f"{metric}_{k}"] = v
            if math.isnan(v):
                undefined[f"{metric}_{k}"] = EMPTY_ONE_SIDE
        missing = [str(k) for k, v in enumerate(per_class, start=1) if math.isnan(v)]
        out[f"mean_fg_{metric}"] = float("nan") if missing else float(np.mean(per_class))
        if missing:
            what = "class" if len(missing) == 1 else "classes"
            undefined[f"mean_fg_{metric}"] = (
                f"{metric} undefined for {what} {', '.join(missing)} ({EMPTY_ONE_SIDE})"
            )
    out["distance_unit"] = "pixel" if spacing is None else "mm"
    out["nsd_tolerance"] = float(tol)
    out["undefined"] = undefined
    return out


def _bootstrap_mean_ci(
    values: np.ndarray, idx: np.ndarray, alpha: float = 0.05
) -> tuple[list[float], int]:
    """Percentile interval of the NaN-excluding mean over resampled cases, and how many
    resamples defined it (those drawing only undefined cases are skipped)."""
    drawn = values[idx]
    counts = (~np.isnan(drawn)).sum(axis=1)
    means = np.nansum(drawn, axis=1)[counts > 0] / counts[counts > 0]
    if not len(means):
        return [float("nan"), float("nan")], 0
    q = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(x) for x in q], len(means)


def aggregate(
    cases: list[dict[str, Any]], *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Summary of ``case_metrics`` results over a test set.

    Returns ``n_cases``, the cases' ``distance_unit`` and ``nsd_tolerance``, ``metrics`` (metric
    -> ``mean``, ``sd`` (ddof=1), ``n`` defined cases, ``n_undefined``, and for ``mean_fg_*`` and
    ``dice_<k>`` ``ci95``: the percentile-bootstrap interval of the mean, over ``n_resamples``
    resamples of cases drawn as ``rng.integers(0, N, N)`` in turn from
    ``numpy.random.default_rng(seed)``) and ``undefined`` (``"<metric>.<stat>"`` -> why that
    value is NaN). Raises ``DataError`` for no cases or cases scored with different units,
    tolerances or classes.
    """
    if not cases:
        raise DataError("aggregate needs at least one case's metrics, got none")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ConfigError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    first = cases[0]
    names = [k for k in first if k not in (*_UNIT_KEYS, "undefined")]
    for i, case in enumerate(cases):
        keys = [k for k in case if k not in (*_UNIT_KEYS, "undefined")]
        if sorted(keys) != sorted(names):
            raise DataError(
                f"case {i} has metrics {sorted(keys)}, case 0 has {sorted(names)}; score every "
                "case with the same num_classes"
            )
        for key in _UNIT_KEYS:
            if case.get(key) != first.get(key):
                raise DataError(
                    f"case {i} has {key} {case.get(key)!r}, case 0 has {first.get(key)!r}; score "
                    "every case with the same spacing convention and NSD tolerance"
                )

    n = len(cases)
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, n, n) for _ in range(n_resamples)])
    metrics: dict[str, dict[str, Any]] = {}
    undefined: dict[str, str] = {}
    for name in names:
        v = np.array([float(c[name]) for c in cases])
        defined = v[~np.isnan(v)]
        entry: dict[str, Any] = {
            "mean": float(defined.mean()) if len(defined) else float("nan"),
            "sd": float(defined.std(ddof=1)) if len(defined) > 1 else float("nan"),
            "n": len(defined),
            "n_undefined": int(n - len(defined)),
        }
        reasons = sorted({c["undefined"][name] for c in cases if name in c.get("undefined", {})})
        why = "; ".join(reasons) or "undefined"
        if not len(defined):
            undefined[f"{name}.mean"] = f"undefined in every case: {why}"
        if len(defined) < 2:
            undefined[f"{name}.sd"] = f"{len(defined)} defined case(s), sd needs 2"
        if _CI_PATTERN.match(name):
            entry["ci95"], used = _bootstrap_mean_ci(v, idx)
            if not used:
                undefined[f"{name}.ci95"] = f"undefined in every case: {why}"
        metrics[name] = entry
    return {
        "n_cases": n,
        "distance_unit": first.get("distance_unit"),
        "nsd_tolerance": first.get("nsd_tolerance"),
        "metrics": metrics,
        "undefined": undefined,
    }
