"""The segmentation task against naive re-implementations: the training loss (soft Dice pooled
over the batch + cross-entropy), validation's hard Dice per case, and the test summary built from
``clinadapt.eval.segmentation``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from clinadapt.data.info import TaskType
from clinadapt.engine.train_config import SELECT_METRICS
from clinadapt.errors import ConfigError, DataError
from clinadapt.eval.segmentation import aggregate, case_metrics
from clinadapt.tasks import TASKS, SegmentationTask, task_for
from clinadapt.tasks.seg_heads import SegmentationHead
from clinadapt.tasks.segmentation import NSD_TOLERANCE, CaseTargets, DiceCELoss

TASK = TASKS.get("segmentation")
SEG = TaskType.SEGMENTATION


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def naive_dice_ce(logits: np.ndarray, targets: np.ndarray, *, pooled: bool = True) -> float:
    """Soft Dice loss over the foreground classes, intersection and sums pooled over the whole
    batch (``pooled``) or per case and averaged, plus the mean pixel cross-entropy."""
    probs = softmax(logits.astype(np.float64))
    b, k = logits.shape[:2]
    groups = [list(range(b))] if pooled else [[i] for i in range(b)]
    dice_losses = []
    for group in groups:
        for c in range(1, k):
            inter = pred_sum = true_sum = 0.0
            for i in group:
                for pos in np.ndindex(*targets.shape[1:]):
                    p = probs[(i, c, *pos)]
                    t = float(targets[(i, *pos)] == c)
                    inter += p * t
                    pred_sum += p
                    true_sum += t
            dice_losses.append(1.0 - 2.0 * inter / (pred_sum + true_sum))
    nll = [
        -math.log(probs[(i, int(targets[(i, *pos)]), *pos)])
        for i in range(b)
        for pos in np.ndindex(*targets.shape[1:])
    ]
    return float(np.mean(dice_losses) + np.mean(nll))


def naive_case_dice(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    """Mean foreground hard Dice of one case; a class absent from both counts 1."""
    values = []
    for c in range(1, k):
        p, t = pred == c, target == c
        total = int(p.sum()) + int(t.sum())
        values.append(1.0 if total == 0 else 2.0 * int((p & t).sum()) / total)
    return float(np.mean(values))


def naive_case_ce(logits: np.ndarray, target: np.ndarray) -> float:
    probs = softmax(logits[None].astype(np.float64))[0]
    return float(
        np.mean([-math.log(probs[(int(target[pos]), *pos)]) for pos in np.ndindex(*target.shape)])
    )


def test_the_task_is_registered_for_segmentation_datasets():
    assert isinstance(TASK, SegmentationTask) and task_for(SEG) is TASK
    assert task_for("segmentation") is TASK
    assert TASK.dense_targets and TASK.default_resize == "bilinear"
    assert TASK.head_kinds[0] == "decoder" and TASK.train_defaults == {"select_metric": "dice"}
    assert set(TASK.select_metrics) <= set(SELECT_METRICS) and "dice" in TASK.select_metrics
    assert set(TASK.report_metrics) <= set(TASK.printed_metrics)


def test_targets_need_background_and_a_class():
    masks = [np.zeros((3, 4), np.uint8)]
    assert TASK.check_targets(masks, SEG, 2, "masks") is masks
    with pytest.raises(DataError, match="train labels.*background and at least one class"):
        TASK.check_targets(masks, SEG, 1, "train labels")


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)], ids=["2d", "3d"])
def test_dice_ce_loss_equals_the_naive_batch_dice_plus_cross_entropy(spatial):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, *spatial, generator=gen) * 2
    targets = torch.randint(0, 3, (3, *spatial), generator=gen)
    targets[0] = 0  # a case without foreground: pooling over the batch still defines its Dice
    loss = DiceCELoss()(logits, targets)
    expected = naive_dice_ce(logits.numpy(), targets.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # the comparison tells pooled from per-case Dice on these inputs
    assert abs(naive_dice_ce(logits.numpy(), targets.numpy(), pooled=False) - expected) > 1e-2


def test_dice_ce_loss_ignores_the_background_channel_and_has_gradients():
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 2, (2, 6, 6), generator=gen)
    logits = torch.randn(2, 2, 6, 6, generator=gen, requires_grad=True)
    loss = DiceCELoss()(logits, targets)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # a perfect, confident prediction costs (almost) nothing
    perfect = nn.functional.one_hot(targets, 2).movedim(-1, 1).float() * 40 - 20
    assert DiceCELoss()(perfect, targets).item() < 1e-4


def test_the_criterion_is_dice_ce_and_refuses_classification_options():
    masks = [np.zeros((4, 4), np.uint8)]
    loss = TASK.criterion(SEG, 2, masks, class_weights=False, label_smoothing=0.0)
    assert isinstance(loss, DiceCELoss)
    for options in (
        {"class_weights": True, "label_smoothing": 0.0},
        {"class_weights": False, "label_smoothing": 0.1},
    ):
        with pytest.raises(ConfigError, match="class_balance=weights and label_smoothing"):
            TASK.criterion(SEG, 2, masks, **options)


def test_scores_are_per_pixel_class_probabilities():
    logits = torch.randn(2, 3, 4, 5)
    scores = TASK.scores(logits, SEG)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(2, 4, 5))
    torch.testing.assert_close(scores, logits.softmax(dim=1))


def test_head_and_forward_give_logits_at_the_input_size():
    class Dense(nn.Module):
        dense_level_dims, dense_level_strides = (6,), ((4, 4),)

        def dense_levels(self, images):
            return [images.mean(dim=1, keepdim=True).expand(-1, 6, -1, -1)[..., ::4, ::4]]

    backbone = Dense()
    head = TASK.head(backbone, 3, "linear")
    assert isinstance(head, SegmentationHead) and head.kind == "linear"
    logits = TASK.forward(backbone, head, torch.randn(2, 3, 18, 22))
    assert logits.shape == (2, 3, 18, 22)


def validation_inputs(spatial, seed=0):
    """Logits and targets where case 0 never predicts class 2 and has none (Dice 1), case 1
    predicts class 1 everywhere and has none of it (Dice 0), the rest are random."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 3, *spatial, generator=gen)
    targets = torch.randint(0, 3, (5, *spatial), generator=gen)
    logits[0, 2] = -10.0
    targets[0][targets[0] == 2] = 1
    logits[1, 1] = 10.0
    targets[1][targets[1] == 1] = 0
    return logits, targets


@pytest.mark.parametrize("spatial", [(6, 7), (3, 4, 5)], ids=["2d", "3d"])
def test_validation_is_the_naive_per_case_hard_dice_and_ce_plus_one_minus_dice(spatial):
    logits, targets = validation_inputs(spatial)
    # the loop gathers one part per batch and concatenates them in example order
    parts = torch.cat(
        [TASK.validation_part(logits[s], targets[s], SEG) for s in (slice(0, 2), slice(2, 5))]
    )
    assert parts.shape == (5, 3 * 2 + 1) and parts.dtype == torch.float64
    metrics = TASK.validation_metrics(parts.numpy(), None, SEG)
    pred = logits.argmax(dim=1).numpy()
    dice = [naive_case_dice(pred[i], targets[i].numpy(), 3) for i in range(5)]
    assert not (pred[0] == 2).any() and not (targets[0] == 2).any()  # class 2 counts 1
    assert (pred[1] == 1).all() and not (targets[1] == 1).any()  # class 1 counts 0
    ce = [naive_case_ce(logits[i].numpy(), targets[i].numpy()) for i in range(5)]
    assert metrics["dice"] == pytest.approx(np.mean(dice), abs=1e-12)
    assert metrics["loss"] == pytest.approx(np.mean(ce) + 1 - np.mean(dice), rel=1e-6)
    # the same Dice as the test metrics give each case at this size
    fg = [case_metrics(pred[i], targets[i].numpy(), 3)["mean_fg_dice"] for i in range(5)]
    assert metrics["dice"] == pytest.approx(np.mean(fg), abs=1e-6)


def test_validation_counts_a_class_absent_from_prediction_and_truth_as_one():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 1, :2] = 5.0  # class 1 exactly right, class 2 nowhere
    metrics = TASK.validation_metrics(TASK.validation_part(logits, target, SEG).numpy(), None, SEG)
    assert metrics["dice"] == 1.0
    logits[0, 2, 0, 0] = 9.0  # one false class-2 pixel: Dice 0 for class 2
    metrics = TASK.validation_metrics(TASK.validation_part(logits, target, SEG).numpy(), None, SEG)
    assert metrics["dice"] == pytest.approx((2 * 7 / 15 + 0) / 2)


def scored_cases():
    """Predictions and truths of varying sizes; case 2 misses class 2 (HD95 undefined), case 3
    is empty in both (Dice 1)."""
    rng = np.random.default_rng(0)
    preds, masks = [], []
    for i, shape in enumerate([(12, 14), (16, 10), (11, 11), (9, 13), (15, 12)]):
        mask = np.zeros(shape, np.uint8)
        mask[2:7, 3:8] = 1
        mask[8:, 1:4] = 2
        pred = np.roll(mask, i % 3, axis=1)
        flip = rng.random(shape) < 0.05
        pred[flip] = rng.integers(0, 3, int(flip.sum()))
        if i == 2:
            pred[pred == 2] = 0
        if i == 3:
            mask[:], pred[:] = 0, 0
        preds.append(pred)
        masks.append(mask)
    ids = [f"case{i}" for i in range(5)]
    return preds, CaseTargets(masks=masks, num_classes=3, spacing=[None] * 5, ids=ids)


def same(a, b) -> bool:
    """Equality with NaN equal to NaN, through nested dicts and lists."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_score_cases_are_case_metrics_with_ids():
    preds, targets = scored_cases()
    cases = TASK.score_cases(preds, targets)
    assert [c["id"] for c in cases] == targets.ids and len(targets) == 5
    for pred, mask, case in zip(preds, targets.masks, cases, strict=True):
        expected = case_metrics(pred, mask, 3, nsd_tolerance_mm=NSD_TOLERANCE)
        assert same({k: v for k, v in case.items() if k != "id"}, expected)
    assert math.isnan(cases[2]["hd95_2"]) and cases[3]["mean_fg_dice"] == 1.0
    with pytest.raises(DataError, match="4 predictions for 5 cases"):
        TASK.score_cases(preds[:4], targets)


def test_score_cases_use_each_case_s_spacing():
    mask = np.zeros((4, 8, 8), np.uint8)
    mask[1:3, 2:6, 2:6] = 1
    pred = np.roll(mask, 1, axis=2)
    targets = CaseTargets(masks=[mask], num_classes=2, spacing=[(3.0, 0.5, 0.5)], ids=["v"])
    (case,) = TASK.score_cases([pred], targets)
    assert case["distance_unit"] == "mm" and case["hd95_1"] == pytest.approx(0.5)
    assert case["nsd_tolerance"] == NSD_TOLERANCE


def test_summarise_is_the_aggregate_of_the_cases():
    preds, targets = scored_cases()
    cases = TASK.score_cases(preds, targets)
    test, ci = TASK.summarise(cases, 20, 7)
    scored = [{k: v for k, v in c.items() if k != "id"} for c in cases]
    summary = aggregate(scored, n_resamples=20, seed=7)
    stats = summary["metrics"]
    for metric in ("dice", "iou", "hd95", "nsd"):
        values = np.array([c[f"mean_fg_{metric}"] for c in cases])
        assert test[metric] == pytest.approx(np.nanmean(values))
        assert test[metric] == stats[f"mean_fg_{metric}"]["mean"]
        assert test["n_undefined"][metric] == int(np.isnan(values).sum())
        assert ci[metric] == stats[f"mean_fg_{metric}"]["ci95"]
    assert test["n_undefined"] == {"dice": 0, "iou": 0, "hd95": 1, "nsd": 0}
    assert test["dice"] == pytest.approx(
        np.mean([naive_case_dice(p, m, 3) for p, m in zip(preds, targets.masks, strict=True)])
    )
    assert test["n_cases"] == 5 and test["cases"] is cases
    assert test["distance_unit"] == "pixel" and test["nsd_tolerance"] == NSD_TOLERANCE
    assert same(test["per_class"], stats) and test["undefined"] == summary["undefined"]
    assert set(ci) == {"dice", "iou", "hd95", "nsd"}
    assert all(lo <= test[m] <= hi for m, (lo, hi) in ci.items())
    # no resamples: no intervals, the same point estimates
    test0, ci0 = TASK.summarise(cases, 0, 7)
    assert ci0 == {} and same(
        {k: v for k, v in test0.items() if k != "per_class"},
        {k: v for k, v in test.items() if k != "per_class"},
    )


def test_evaluate_and_bootstrap_wrap_score_cases_and_summarise():
    preds, targets = scored_cases()
    cases = TASK.score_cases(preds, targets)
    test, ci = TASK.summarise(cases, 20, 3)
    evaluated = TASK.evaluate(targets, preds, SEG)
    assert same(evaluated["cases"], cases) and evaluated["dice"] == test["dice"]
    assert same(evaluated["n_undefined"], test["n_undefined"])
    assert TASK.bootstrap(targets, preds, SEG, 20, 3) == ci
    assert TASK.bootstrap(targets, preds, SEG, 20, 4) != ci
