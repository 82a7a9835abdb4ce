"""Segmentation metrics checked against naive re-implementations: Dice and IoU by counting, HD95
and NSD from explicit surface-point sets and all pairwise distances."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from clinadapt.errors import ConfigError, DataError
from clinadapt.eval.segmentation import EMPTY_ONE_SIDE, aggregate, case_metrics

CASES = [  # shape, classes, spacing (None: pixels)
    ((40, 48), 3, (0.7, 1.3)),
    ((40, 48), 2, None),
    ((14, 18, 20), 3, (2.5, 0.8, 1.1)),
]


def blobs(shape, num_classes, seed, smooth=2.5):
    """A label map of smooth random blobs, and a prediction that shifts and perturbs it."""
    rng = np.random.default_rng(seed)
    target = np.zeros(shape, np.int64)
    for k in range(1, num_classes):
        field = gaussian_filter(rng.standard_normal(shape), smooth)
        target[field > np.quantile(field, 1 - 0.25 / num_classes)] = k
    pred = np.roll(target, shift=1, axis=-1)
    flip = rng.random(shape) < 0.02
    pred[flip] = rng.integers(0, num_classes, flip.sum())
    return pred, target


def surface(mask, spacing):
    """Physical coordinates of the mask's voxels that have a face neighbour outside it (the
    image border counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded.copy()
    for axis in range(mask.ndim):
        for step in (1, -1):
            inner &= np.roll(padded, step, axis=axis)
    edge = mask & ~inner[(slice(1, -1),) * mask.ndim]
    return np.argwhere(edge) * np.asarray(spacing)


def naive(pred, target, k, spacing, tol):
    """Per-class metrics by counting and from all surface-point distances; also the pooled
    HD95 (percentile of both directed distance sets together), which MONAI does not use."""
    p, t = pred == k, target == k
    inter = (p & t).sum()
    dice, iou = 2 * inter / (p.sum() + t.sum()), inter / (p | t).sum()
    spacing = spacing or (1.0,) * pred.ndim
    d = cdist(surface(p, spacing), surface(t, spacing))
    pred_to_gt, gt_to_pred = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95))
    pooled = np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95)
    nsd = ((pred_to_gt <= tol).sum() + (gt_to_pred <= tol).sum()) / sum(d.shape)
    return {"dice": dice, "iou": iou, "hd95": hd95, "nsd": nsd}, pooled


@pytest.mark.parametrize(("shape", "num_classes", "spacing"), CASES)
def test_metrics_match_naive_counting_and_point_sets(shape, num_classes, spacing):
    pred, target = blobs(shape, num_classes, seed=len(shape) + num_classes)
    tol = 1.5
    out = case_metrics(pred, target, num_classes, spacing=spacing, nsd_tolerance_mm=tol)
    assert out["undefined"] == {}
    assert out["distance_unit"] == ("pixel" if spacing is None else "mm")
    assert out["nsd_tolerance"] == tol
    pooled_differs = False
    for k in range(1, num_classes):
        expected, pooled = naive(pred, target, k, spacing, tol)
        for metric, value in expected.items():
            assert out[f"{metric}_{k}"] == pytest.approx(value, rel=1e-5), (metric, k)
        assert 0 < out[f"dice_{k}"] < 1 and 0 < out[f"nsd_{k}"] < 1
        pooled_differs |= not math.isclose(pooled, expected["hd95"], rel_tol=1e-5)
    # the HD95 check can tell "larger directed percentile" from "percentile of pooled distances"
    assert pooled_differs
    for metric in ("dice", "iou", "hd95", "nsd"):
        per_class = [out[f"{metric}_{k}"] for k in range(1, num_classes)]
        assert out[f"mean_fg_{metric}"] == pytest.approx(np.mean(per_class))


def test_spacing_scales_distances_per_axis():
    pred, target = blobs((30, 30), 2, seed=3)
    unit = case_metrics(pred, target, 2)
    doubled = case_metrics(pred, target, 2, spacing=(2.0, 2.0), nsd_tolerance_mm=2.0)
    assert doubled["hd95_1"] == pytest.approx(2 * unit["hd95_1"], rel=1e-6)
    assert doubled["nsd_1"] == pytest.approx(unit["nsd_1"])
    assert doubled["dice_1"] == unit["dice_1"]
    # the prediction is shifted along the last axis: only that axis's spacing moves HD95
    stretched_last = case_metrics(pred, target, 2, spacing=(1.0, 3.0))
    stretched_first = case_metrics(pred, target, 2, spacing=(3.0, 1.0))
    assert stretched_last["hd95_1"] > stretched_first["hd95_1"]


def test_identical_masks_are_perfect():
    _, target = blobs((12, 16, 16), 3, seed=5)
    out = case_metrics(target, target, 3, spacing=(3.0, 1.0, 1.0), nsd_tolerance_mm=0.0)
    for metric, perfect in {"dice": 1, "iou": 1, "hd95": 0, "nsd": 1}.items():
        assert out[f"mean_fg_{metric}"] == perfect


def test_empty_conventions():
    target = np.zeros((16, 16), np.int64)
    target[2:6, 2:6] = 1  # class 1 in ground truth only, class 2 in prediction only
    pred = np.zeros_like(target)
    pred[9:12, 9:12] = 2
    out = case_metrics(pred, target, 4)  # class 3: absent from both
    assert [out[f"dice_{k}"] for k in (1, 2, 3)] == [0, 0, 1]
    assert [out[f"iou_{k}"] for k in (1, 2, 3)] == [0, 0, 1]
    assert [out[f"nsd_{k}"] for k in (1, 2, 3)] == [0, 0, 1]
    assert math.isnan(out["hd95_1"]) and math.isnan(out["hd95_2"]) and out["hd95_3"] == 0
    assert out["mean_fg_dice"] == pytest.approx(1 / 3)
    assert math.isnan(out["mean_fg_hd95"])
    assert out["undefined"] == {
        "hd95_1": EMPTY_ONE_SIDE,
        "hd95_2": EMPTY_ONE_SIDE,
        "mean_fg_hd95": f"hd95 undefined for classes 1, 2 ({EMPTY_ONE_SIDE})",
    }


def test_every_nan_has_a_reason():
    pred, target = blobs((20, 20), 4, seed=11)
    target[target == 3] = 0  # class 3 predicted but not in the ground truth
    for out in (case_metrics(pred, target, 4), aggregate([case_metrics(pred, target, 4)])):
        flat = out.get("metrics", out)
        for name, value in flat.items():
            for stat, v in value.items() if isinstance(value, dict) else [(None, value)]:
                key = name if stat is None else f"{name}.{stat}"
                if isinstance(v, float) and math.isnan(v):
                    assert key in out["undefined"], key
                if isinstance(v, list) and any(map(math.isnan, v)):
                    assert key in out["undefined"], key


@pytest.mark.parametrize(
    ("pred", "target", "kwargs", "message"),
    [
        (np.zeros((4, 5)), np.zeros((4, 6)), {}, r"shape \(4, 5\) differs .* \(4, 6\)"),
        (np.full((4, 4), 3), np.zeros((4, 4)), {}, r"label 3 outside \[0, 3\)"),
        (np.zeros((4, 4)), np.full((4, 4), -1), {}, r"ground truth has label -1 outside"),
        (np.full((4, 4), 0.5), np.zeros((4, 4)), {}, r"non-integer label 0\.5"),
        (np.zeros((4, 4)), np.full((4, 4), np.nan), {}, "ground truth contains NaN"),
        (np.zeros((4, 4), "U1"), np.zeros((4, 4)), {}, "integer label map, got dtype <U1"),
        (np.zeros(4), np.zeros(4), {}, r"2D \(H, W\) or 3D"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {"spacing": (1.0,)}, r"spacing \(1\.0,\) has 1"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {"spacing": (1.0, 0.0)}, r"\(1\.0, 0\.0\) must be"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {"spacing": (1, float("nan"))}, "positive finite"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {"spacing": "12"}, "mm per axis"),
    ],
)
def test_bad_input_is_a_data_error_naming_the_value(pred, target, kwargs, message):
    with pytest.raises(DataError, match=message):
        case_metrics(pred, target, 3, **kwargs)


def test_bad_options_are_config_errors():
    a = np.zeros((4, 4), np.int64)
    with pytest.raises(ConfigError, match="at least 2"):
        case_metrics(a, a, 1)
    with pytest.raises(ConfigError, match="nsd_tolerance_mm .* got -1"):
        case_metrics(a, a, 2, nsd_tolerance_mm=-1)
    with pytest.raises(ConfigError, match="nsd_tolerance_mm .* got .1mm."):
        case_metrics(a, a, 2, nsd_tolerance_mm="1mm")
    with pytest.raises(ConfigError, match="n_resamples"):
        aggregate([case_metrics(a, a, 2)], n_resamples=0)


def test_float_and_bool_label_maps_with_integer_values_are_accepted():
    pred, target = blobs((20, 20), 2, seed=2)
    expected = case_metrics(pred, target, 2)
    assert case_metrics(pred.astype(np.float32), target.astype(bool), 2) == expected


def _naive_aggregate(cases, name, n_resamples, seed):
    v = np.array([c[name] for c in cases], dtype=float)
    ok = v[~np.isnan(v)]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_resamples):
        draw = v[rng.integers(0, len(v), len(v))]
        draw = draw[~np.isnan(draw)]
        if len(draw):
            means.append(sum(draw) / len(draw))
    return ok.mean(), np.std(ok, ddof=1), list(np.percentile(means, [2.5, 97.5]))


def test_aggregate_matches_a_naive_bootstrap():
    cases = []
    for seed in range(12):
        pred, target = blobs((24, 24), 3, seed=seed, smooth=1.5 + seed / 4)
        if seed % 4 == 0:
            target[target == 2] = 0  # hd95_2 undefined in these cases
        cases.append(case_metrics(pred, target, 3, spacing=(1.0, 0.5)))
    out = aggregate(cases, n_resamples=300, seed=7)
    assert out["n_cases"] == 12 and out["distance_unit"] == "mm" and out["undefined"] == {}
    assert out["metrics"]["hd95_2"]["n"] == 9 and out["metrics"]["hd95_2"]["n_undefined"] == 3
    assert out["metrics"]["mean_fg_hd95"]["n_undefined"] == 3
    assert out["metrics"]["dice_1"]["n_undefined"] == 0
    for name in ("dice_1", "dice_2", "mean_fg_dice", "mean_fg_iou", "mean_fg_hd95", "mean_fg_nsd"):
        mean, sd, ci = _naive_aggregate(cases, name, 300, 7)
        got = out["metrics"][name]
        assert got["mean"] == pytest.approx(mean) and got["sd"] == pytest.approx(sd)
        assert got["ci95"] == pytest.approx(ci)
        assert got["ci95"][0] < got["mean"] < got["ci95"][1]
    assert "ci95" not in out["metrics"]["iou_1"] and "ci95" not in out["metrics"]["hd95_1"]
    assert aggregate(cases, n_resamples=300, seed=7) == out


def test_aggregate_names_metrics_undefined_everywhere():
    target = np.zeros((8, 8), np.int64)
    target[1:3, 1:3] = 1
    cases = [case_metrics(np.zeros_like(target), target, 2)]
    out = aggregate(cases, n_resamples=20)
    assert math.isnan(out["metrics"]["mean_fg_hd95"]["mean"])
    assert all(map(math.isnan, out["metrics"]["mean_fg_hd95"]["ci95"]))
    assert out["undefined"]["hd95_1.mean"] == f"undefined in every case: {EMPTY_ONE_SIDE}"
    assert out["undefined"]["mean_fg_hd95.ci95"].startswith("undefined in every case: hd95")
    assert out["undefined"]["dice_1.sd"] == "1 defined case(s), sd needs 2"


def test_aggregate_refuses_mixed_cases():
    a = np.zeros((6, 6), np.int64)
    with pytest.raises(DataError, match="no cases|none"):
        aggregate([])
    mm, px = case_metrics(a, a, 2, spacing=(1.0, 1.0)), case_metrics(a, a, 2)
    with pytest.raises(DataError, match="case 1 has distance_unit 'pixel', case 0 has 'mm'"):
        aggregate([mm, px])
    with pytest.raises(DataError, match="same num_classes"):
        aggregate([case_metrics(a, a, 2), case_metrics(a, a, 3)])


def test_importing_the_module_does_not_import_monai():
    code = (
        "import sys, clinadapt.eval.segmentation; "
        "assert 'monai' not in sys.modules, 'monai imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
