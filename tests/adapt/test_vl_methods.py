"""Vision-language methods against naive NumPy references, on a joint space whose text encoder
puts each class's prompts near its own axis (so the zero-shot classifier is informative)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from clinadapt.adapt import METHODS, create_method
from clinadapt.adapt.vl.linear_zs import clap_multipliers
from clinadapt.backbones.text_side import JointSpace, TextEncoder
from clinadapt.data.class_text import parse_class_text
from clinadapt.data.info import CLASSIFICATION_TASKS, DatasetInfo, TaskType
from clinadapt.errors import DataError
from clinadapt.eval import evaluate

TEXT = sorted(
    n
    for n in METHODS.names()
    if getattr(METHODS.get(n), "needs_text", False)
    and not getattr(METHODS.get(n), "needs_tokens", False)  # test_prompt_learning.py
)
DIM = 16
SCALE = 10.0
NO_SEARCH = {"search_step": [0, 0]}


class AxisText(TextEncoder):
    """'c<k>' in a text points it along axis k (with text-specific noise); 'no ' flips it."""

    def __init__(self, swap: dict[int, int] | None = None) -> None:
        super().__init__("axis", DIM, "none")
        self.swap = swap or {}

    def _embed(self, texts):
        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)))
            k = int(t.split(" c")[1].split(" ")[0].rstrip("."))
            row = 0.3 * torch.randn(DIM, generator=g)
            row[self.swap.get(k, k)] += -1.0 if " no " in f" {t}" else 3.0
            rows.append(row)
        return torch.stack(rows)


def class_text(task: TaskType, n: int):
    record = {
        "templates": ["an image of c{}.", "a photo showing c{} here."],
        "classes": {str(k): {"name": str(k), "description": f"{k} seen"} for k in range(n)},
    }
    if task is TaskType.MULTILABEL:
        record["negative_templates"] = ["an image with no c{}."]
    info = DatasetInfo("toy", task, tuple(str(k) for k in range(n)), 1, 2)
    return parse_class_text(record, info, "test")


def make(name, task, n, options=None, swap=None):
    method = create_method(name, options)
    space = JointSpace(AxisText(swap), logit_scale=SCALE, image_dim=DIM)
    return method.use_text(space, class_text(task, n)), space


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def text_weights(space, task, n, use="names"):
    """(H, K, d) by hand: normalised prompt embeddings averaged per class, renormalised."""
    heads = class_text(task, n).prompts(task, use)
    return np.stack(
        [
            [unit(unit(space.encode_text(p).numpy()).mean(0, keepdims=True))[0] for p in options]
            for options in heads
        ]
    )


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_zeroshot_matches_naive_softmax(task, separable_data, num_classes):
    n = num_classes[task]
    x, y = separable_data(task, 80, seed=3)
    method, space = make("zeroshot", task, n)
    p = method.fit(x[:0], y[:0], task, n).predict_proba(x)
    w = text_weights(space, task, n)
    logits = SCALE * np.einsum("nd,hkd->nhk", unit(x), w)
    expected = softmax(logits, axis=-1)
    expected = expected[:, 0, :] if task.single_label else expected[:, :, 1]
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)
    assert p.shape == (80, n)
    if task.single_label:
        np.testing.assert_allclose(p.sum(1), 1.0)
    assert evaluate(y, p, task)["auc"] > 0.9
    assert method.fitted_parameters() == 0 and method.text_block()["use"] == "names"


def test_zeroshot_descriptions_and_both_change_the_prompts(separable_data):
    x, _ = separable_data(TaskType.MULTICLASS, 20, seed=3)
    names = make("zeroshot", TaskType.MULTICLASS, 4)[0].fit(x[:0], None, "multi-class", 4)
    both_method = make("zeroshot", TaskType.MULTICLASS, 4, {"text": "both"})[0]
    both = both_method.fit(x[:0], None, "multi-class", 4)
    assert not np.allclose(names.predict_proba(x), both.predict_proba(x))
    assert both.text_block()["classes"]["1"] == ["1", "1 seen"]


def naive_tip(xq, xs, ys, w, alpha, beta, n):
    """Tip-Adapter's formula as in its paper, single-label."""
    f, keys = unit(xq), unit(xs)
    affinity = np.exp(-beta * (1 - f @ keys.T))
    return softmax(SCALE * f @ w[0].T + alpha * affinity @ np.eye(n)[ys[:, 0]], axis=1)


def test_tip_adapter_matches_the_affinity_formula(separable_data):
    task, n = TaskType.MULTICLASS, 4
    xs, ys = separable_data(task, 12, seed=1)
    xq, _ = separable_data(task, 30, seed=2)
    options = {**NO_SEARCH, "alpha": 2.5, "beta": 3.0}
    method, space = make("tip_adapter", task, n, options)
    p = method.fit(xs, ys, task, n).predict_proba(xq)
    w = text_weights(space, task, n)
    np.testing.assert_allclose(p, naive_tip(xq, xs, ys, w, 2.5, 3.0, n), rtol=1e-5, atol=1e-7)
    assert method.selected()["selection"] == "default" and method.fitted_parameters() == 0


def test_tip_adapter_search_picks_the_best_validation_accuracy(separable_data):
    task, n = TaskType.MULTICLASS, 4
    xs, ys = separable_data(task, 8, seed=1, shift=1.5)
    xv, yv = separable_data(task, 16, seed=2, shift=1.5)
    options = {"search_scale": [5.0, 4.0], "search_step": [6, 5]}
    # text of class 0 points at class 1: the cache must correct it
    method, space = make("tip_adapter", task, n, options, swap={0: 1})
    method.fit(xs, ys, task, n, val=(xv, yv))
    chosen = method.selected()
    w = text_weights(space, task, n)
    best = None
    for beta in 0.1 + np.arange(6) * (5.0 - 0.1) / 6:
        for alpha in 0.1 + np.arange(5) * (4.0 - 0.1) / 5:
            p = naive_tip(xv, xs, ys, w, alpha, beta, n)
            key = ((p.argmax(1) == yv[:, 0]).mean(), np.log(p[np.arange(16), yv[:, 0]]).mean())
            if best is None or key > best[0]:
                best = (key, alpha, beta)
    assert chosen["alpha"] == pytest.approx(best[1]) and chosen["beta"] == pytest.approx(best[2])
    assert chosen["val_acc"] == pytest.approx(best[0][0])
    assert chosen["grid"] == [6, 5]


def test_tip_adapter_f_trains_its_keys_deterministically(separable_data):
    task, n = TaskType.BINARY, 2
    xs, ys = separable_data(task, 10, seed=1, shift=1.0)
    xq, _ = separable_data(task, 20, seed=2)
    options = {**NO_SEARCH, "epochs": 30, "lr": 0.01}
    first, _ = make("tip_adapter_f", task, n, options, swap={0: 1})
    first.fit(xs, ys, task, n, seed=4)
    plain, _ = make("tip_adapter", task, n, NO_SEARCH, swap={0: 1})
    plain.fit(xs, ys, task, n)
    assert first.fitted_parameters() == 10 * DIM
    assert not np.allclose(first.predict_proba(xq), plain.predict_proba(xq))
    again, _ = make("tip_adapter_f", task, n, options, swap={0: 1})
    again.fit(xs, ys, task, n, seed=4)
    np.testing.assert_array_equal(first.predict_proba(xq), again.predict_proba(xq))
    support = lambda m: -np.log(m.predict_proba(xs)[np.arange(10), ys[:, 0]]).mean()  # noqa: E731
    assert support(first) < support(plain)


def test_linear_zs_stays_at_the_text_or_learns_the_support(separable_data):
    task, n = TaskType.MULTICLASS, 4
    xs, ys = separable_data(task, 16, seed=1)
    xq, yq = separable_data(task, 200, seed=2)
    zero = make("zeroshot", task, n, swap={0: 1})[0].fit(xs[:0], None, task, n)
    held, _ = make("linear_zs", task, n, {"penalty": 1e6, "epochs": 20}, swap={0: 1})
    held.fit(xs, ys, task, n)
    np.testing.assert_allclose(held.predict_proba(xq), zero.predict_proba(xq), atol=1e-3)
    free, _ = make("linear_zs", task, n, {"epochs": 100}, swap={0: 1})
    free.fit(xs, ys, task, n)
    acc = lambda m: (m.predict_proba(xq).argmax(1) == yq[:, 0]).mean()  # noqa: E731
    assert acc(free) > acc(zero) + 0.15
    assert free.fitted_parameters() == n * DIM and free.selected()["penalty"] == "clap"


def test_clap_multipliers_are_the_mean_true_class_probability():
    logits = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[1.0, 1.0, 3.0]]])
    targets = torch.tensor([[0], [0], [2]])
    lam = clap_multipliers(logits, targets).numpy()
    p = softmax(logits.numpy(), axis=-1)
    np.testing.assert_allclose(lam[0, 0], (p[0, 0, 0] + p[1, 0, 0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(lam[0, 2], p[2, 0, 2], rtol=1e-6)
    assert lam[0, 1] == 1.0  # no support example: held at the text


@pytest.mark.parametrize(("name", "task"), [(m, t) for m in TEXT for t in CLASSIFICATION_TASKS])
def test_contract_on_every_task(name, task, separable_data, num_classes):
    n = num_classes[task]
    x, y = separable_data(task, 24, seed=1)
    val = separable_data(task, 12, seed=2)
    xq, yq = separable_data(task, 60, seed=3)
    options = {"epochs": 5} if name in ("tip_adapter_f", "linear_zs") else {}
    method, _ = make(name, task, n, options)
    p = method.fit(x, y, task, n, val=val, seed=0).predict_proba(xq)
    assert p.shape == (60, n) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    if task.single_label:
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert evaluate(yq, p, task)["auc"] > 0.85
    with pytest.raises(DataError, match="dimension|do not fit"):
        method.predict_proba(xq[:, :5])


@pytest.mark.parametrize("name", TEXT)
def test_text_and_class_count_are_checked(name, separable_data):
    x, y = separable_data(TaskType.MULTICLASS, 12, seed=1)
    with pytest.raises(RuntimeError, match="use_text"):
        create_method(name).fit(x, y, TaskType.MULTICLASS, 4)
    method, _ = make(name, TaskType.MULTICLASS, 3)
    with pytest.raises(DataError, match="describes 3 classes, the task has 4"):
        method.fit(x, y, TaskType.MULTICLASS, 4)
    with pytest.raises(RuntimeError, match="fit"):
        make(name, TaskType.MULTICLASS, 4)[0].predict_proba(x)
