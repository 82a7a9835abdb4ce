import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import StandardScaler

from clinadapt.adapt import create_method
from clinadapt.data.info import CLASSIFICATION_TASKS, TaskType

GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@pytest.fixture
def noisy(separable_data):
    """Overlapping classes, so that validation scores differ between values of C."""
    return lambda task, n, seed: separable_data(task, n, seed, shift=0.8)


def _manual_auc(y, p, task):
    if task is TaskType.BINARY:
        return roc_auc_score(y[:, 0], p[:, 1])
    if task.single_label:
        return np.mean([roc_auc_score(y[:, 0] == c, p[:, c]) for c in range(p.shape[1])])
    return np.mean([roc_auc_score(y[:, c], p[:, c]) for c in range(p.shape[1])])


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_selected_c_matches_a_manual_grid_search_on_validation(task, noisy, num_classes):
    (x, y), (xv, yv) = noisy(task, 60, 0), noisy(task, 60, 1)
    scaler = StandardScaler().fit(x)
    scores = []
    for c in GRID:
        columns = [y[:, 0]] if task.single_label else list(y.T)
        models = [
            LogisticRegression(C=c, solver="lbfgs", max_iter=1000).fit(scaler.transform(x), col)
            for col in columns
        ]
        if task.single_label:
            p = models[0].predict_proba(scaler.transform(xv))
        else:
            p = np.stack([m.predict_proba(scaler.transform(xv))[:, 1] for m in models], axis=1)
        scores.append(_manual_auc(yv, p, task))
    method = create_method("linear", {"c_grid": list(GRID)})
    chosen = method.fit(x, y, task, num_classes[task], val=(xv, yv)).selected()
    assert chosen["C"] == GRID[int(np.argmax(scores))]
    assert chosen["selection"] == "validation auc"
    np.testing.assert_allclose(chosen["val_scores"], scores, rtol=1e-9)
    assert chosen["val_score"] == pytest.approx(max(scores))
    assert chosen["converged"] is True


def test_selection_sees_only_validation_features(monkeypatch, noisy):
    seen = []

    class Recording(LogisticRegression):
        def predict_proba(self, x):
            seen.append(np.array(x))
            return super().predict_proba(x)

    monkeypatch.setattr("clinadapt.adapt.linear.LogisticRegression", Recording)
    task = TaskType.MULTICLASS
    (x, y), (xv, yv), (xt, _) = noisy(task, 40, 0), noisy(task, 30, 1), noisy(task, 20, 2)
    method = create_method("linear", {"c_grid": list(GRID)}).fit(x, y, task, 4, val=(xv, yv))
    expected_val = StandardScaler().fit(x).transform(xv)
    assert len(seen) == len(GRID)
    for arr in seen:
        np.testing.assert_allclose(arr, expected_val)
    seen.clear()
    method.predict_proba(xt)
    assert len(seen) == 1 and seen[0].shape == (20, 16)


def test_without_validation_uses_c_1_and_says_so(noisy):
    x, y = noisy(TaskType.BINARY, 40, 0)
    chosen = create_method("linear").fit(x, y, TaskType.BINARY, 2).selected()
    assert chosen["C"] == 1.0 and "no validation" in chosen["selection"]


def test_falls_back_to_log_loss_when_validation_auc_is_undefined(noisy):
    (x, y), (xv, yv) = noisy(TaskType.BINARY, 40, 0), noisy(TaskType.BINARY, 30, 1)
    keep = yv[:, 0] == 0  # validation holds one class only
    chosen = (
        create_method("linear", {"c_grid": list(GRID)})
        .fit(x, y, TaskType.BINARY, 2, val=(xv[keep], yv[keep]))
        .selected()
    )
    scaler = StandardScaler().fit(x)
    losses = [
        log_loss(
            yv[keep, 0],
            LogisticRegression(C=c, max_iter=1000)
            .fit(scaler.transform(x), y[:, 0])
            .predict_proba(scaler.transform(xv[keep])),
            labels=[0, 1],
        )
        for c in GRID
    ]
    assert chosen["selection"] == "validation log_loss"
    assert chosen["C"] == GRID[int(np.argmin(losses))]
    np.testing.assert_allclose(chosen["val_scores"], losses, rtol=1e-9)


def test_class_weight_balanced_is_passed_to_the_solver(noisy):
    x, y = noisy(TaskType.BINARY, 40, 0)
    keep = (y[:, 0] == 1) | (np.arange(40) < 30)  # imbalanced
    method = create_method("linear", {"class_weight": "balanced"})
    method.fit(x[keep], y[keep], TaskType.BINARY, 2)
    assert method._probes[0].model.class_weight == "balanced"


def test_fitted_parameters_count_the_probe_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 7))
    y = (np.arange(60) % 3).reshape(-1, 1)
    linear = create_method("linear").fit(x, y, TaskType.MULTICLASS, 3)
    assert linear.fitted_parameters() == 3 * 7 + 3
    assert create_method("knn").fit(x, y, TaskType.MULTICLASS, 3).fitted_parameters() == 0
    proto = create_method("prototype").fit(x, y, TaskType.MULTICLASS, 3)
    assert proto.fitted_parameters() == 3 * 7 + 7


@pytest.mark.parametrize("task", [TaskType.BINARY, TaskType.MULTICLASS])
def test_linear_head_gives_the_probe_s_probabilities(task, noisy, num_classes):
    from scipy.special import expit, softmax

    (x, y), (xv, _) = noisy(task, 60, 0), noisy(task, 30, 1)
    probe = create_method("linear").fit(x, y, task, num_classes[task])
    head = probe.linear_head()
    z = ((xv - head.mean) / head.scale) @ head.coef.T + head.intercept
    if task is TaskType.BINARY:
        assert head.coef.shape == (1, x.shape[1])
        expected = np.concatenate([1 - expit(z), expit(z)], axis=1)
    else:
        expected = softmax(z, axis=1)
    np.testing.assert_allclose(probe.predict_proba(xv), expected, atol=1e-10)
    head.coef[:] = 0  # a copy: the probe is unchanged
    np.testing.assert_allclose(probe.predict_proba(xv), expected, atol=1e-10)


def test_linear_head_is_refused_where_no_softmax_head_exists(noisy, num_classes):
    from clinadapt.errors import ClinadaptError

    x, y = noisy(TaskType.MULTILABEL, 60, 0)
    probe = create_method("linear").fit(x, y, TaskType.MULTILABEL, num_classes[TaskType.MULTILABEL])
    with pytest.raises(ClinadaptError, match="multi-label"):
        probe.linear_head()
    x, y = noisy(TaskType.MULTICLASS, 60, 0)
    keep = y[:, 0] != 0
    partial = create_method("linear").fit(x[keep], y[keep], TaskType.MULTICLASS, 4)
    with pytest.raises(ClinadaptError, match="saw only classes"):
        partial.linear_head()


def _per_c_probe(x, y, xv, yv, xt, task, grid):
    """The probe as a plain per-C scikit-learn grid search selected by roc_auc_score (ties: the
    smaller C), returning the chosen C, every C's validation AUC and the chosen probe's test
    probabilities."""
    scaler = StandardScaler().fit(x)
    columns = [y[:, 0]] if task.single_label else list(y.T)
    fits = []
    for c in grid:
        models = [
            LogisticRegression(C=c, solver="lbfgs", max_iter=1000, random_state=0).fit(
                scaler.transform(x), col
            )
            for col in columns
        ]
        fits.append(models)

    def proba(models, q):
        if task.single_label:
            return models[0].predict_proba(scaler.transform(q))
        return np.stack([m.predict_proba(scaler.transform(q))[:, 1] for m in models], axis=1)

    scores = [_manual_auc(yv, proba(models, xv), task) for models in fits]
    best = int(np.argmax(scores))
    return grid[best], scores, proba(fits[best], xt)


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_probe_equals_a_per_c_scikit_learn_search_where_fits_stop_early(
    task, separable_data, num_classes
):
    """More features than examples, as with real few-shot supports: at large C the data are
    separable and L-BFGS stops on its tolerance, where only a fit from the same start agrees."""
    from clinadapt.eval import bootstrap_ci, evaluate

    (x, y), (xv, yv), (xt, yt) = (
        separable_data(task, n, seed, dim=64, shift=1.5) for n, seed in ((24, 0), (40, 1), (60, 2))
    )
    grid = tuple(float(c) for c in np.logspace(-4, 4, 9))
    c, scores, expected = _per_c_probe(x, y, xv, yv, xt, task, grid)
    probe = create_method("linear").fit(x, y, task, num_classes[task], val=(xv, yv))
    got = probe.predict_proba(xt)
    assert probe.selected()["C"] == c
    np.testing.assert_allclose(probe.selected()["val_scores"], scores, atol=1e-9)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    old, new = evaluate(yt, expected, task), evaluate(yt, got, task)
    for metric in ("auc", "acc", "balanced_accuracy", "macro_f1", "ece"):
        assert new[metric] == pytest.approx(old[metric], abs=1e-6)
    np.testing.assert_allclose(
        list(bootstrap_ci(yt, got, task, n_resamples=200).values()),
        list(bootstrap_ci(yt, expected, task, n_resamples=200).values()),
        atol=1e-6,
    )


def test_fits_run_on_one_blas_thread(monkeypatch, noisy):
    """Few-shot supports are small: BLAS threads cost more than they save, and one thread gives
    the same probe whatever the machine's thread settings."""
    from threadpoolctl import threadpool_info

    threads = []
    fit = LogisticRegression.fit

    def recording(self, *args, **kwargs):
        threads.extend(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", recording)
    (x, y), (xv, yv) = noisy(TaskType.MULTILABEL, 40, 0), noisy(TaskType.MULTILABEL, 30, 1)
    create_method("linear", {"c_grid": list(GRID)}).fit(x, y, TaskType.MULTILABEL, 4, val=(xv, yv))
    assert threads and set(threads) == {1}
