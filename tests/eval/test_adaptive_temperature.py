"""Adaptive temperature against numpy.polyval, and its exact no-op on two-way softmaxes."""

import numpy as np
import pytest
import torch

from clinadapt.data.info import CLASSIFICATION_TASKS, TaskType
from clinadapt.eval.adaptive_temperature import (
    POLYNOMIAL,
    adaptive_beta,
    adaptive_probabilities,
    adaptive_temperature,
    softmax_entropy,
)

PAPER_POLYNOMIAL = [-0.037, 0.481, -2.3, 4.917, -1.791]


def reference(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """The paper's rule in numpy: beta from numpy.polyval of the softmax entropy."""
    z = logits - logits.max(axis=axis, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)
    h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=axis, keepdims=True)
    beta = np.where(h > 0.5, np.maximum(np.polyval(PAPER_POLYNOMIAL, h), 1.0), 1.0)
    return logits * beta


def test_beta_is_numpy_polyval_above_the_threshold():
    assert list(POLYNOMIAL) == PAPER_POLYNOMIAL
    h = np.concatenate([np.linspace(0.0, 7.0, 7001), [0.5, np.nextafter(0.5, 1), np.log(2)]])
    expected = np.where(h > 0.5, np.maximum(np.polyval(PAPER_POLYNOMIAL, h), 1.0), 1.0)
    got = adaptive_beta(torch.from_numpy(h)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert (got >= 1).all() and got.max() > 2.4  # sharpening only, up to 2.42 at H = 4.41


def test_where_the_polynomial_exceeds_one():
    """What the module docstring states: beta > 1 only for 0.84858 < H < 5.94452, and the
    polynomial is at most 0.6638 (at ln 2) on (0.5, ln 2]."""
    roots = np.roots(np.subtract(PAPER_POLYNOMIAL, [0, 0, 0, 0, 1]))
    real = np.sort(roots[np.abs(roots.imag) < 1e-12].real)
    np.testing.assert_allclose(real, [0.84858, 5.94452], atol=1e-5)
    below = np.polyval(PAPER_POLYNOMIAL, np.linspace(0.0, 0.84858, 100_001))
    assert below.max() < 1.0  # the H > 0.5 gate never binds
    binary = np.linspace(0.5, np.log(2), 100_001)[1:]
    values = np.polyval(PAPER_POLYNOMIAL, binary)
    assert values.max() == pytest.approx(0.66381, abs=1e-5)
    assert values.argmax() == len(binary) - 1 and (np.diff(values) > 0).all()
    h = torch.tensor([0.848, 0.849, 5.944, 5.945], dtype=torch.float64)
    assert adaptive_beta(h).tolist()[0] == 1.0 and adaptive_beta(h).tolist()[3] == 1.0
    assert min(adaptive_beta(h).tolist()[1:3]) > 1.0


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_adaptive_temperature_matches_the_numpy_rule(dim):
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-2, 1, 40, dtype=torch.float64).reshape(4, 10, 1)
    logits = torch.randn(4, 10, 12, generator=g, dtype=torch.float64) * scale
    got = adaptive_temperature(logits, dim=dim)
    np.testing.assert_allclose(got.numpy(), reference(logits.numpy(), axis=dim), rtol=1e-12)
    h = softmax_entropy(logits, dim)
    changed = (got != logits).any(dim=dim, keepdim=True)
    assert changed.any() and (~changed).any()
    assert not changed[h <= 0.5].any()


def test_rows_at_or_below_the_threshold_are_returned_bit_for_bit():
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.2, 0.0]])
    h = softmax_entropy(logits)
    assert h[0, 0] < 0.5 < 0.85 < h[1, 0]
    out = adaptive_temperature(logits)
    assert torch.equal(out[0], logits[0])
    assert not torch.equal(out[1], logits[1])
    assert softmax_entropy(out)[1, 0] < h[1, 0]


def test_entropy_ignores_masked_keys_and_never_makes_nan():
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [float("-inf")] * 3])
    h = softmax_entropy(logits)
    assert h[0, 0].item() == pytest.approx(np.log(2))
    out = adaptive_temperature(logits)
    assert torch.equal(out[0], logits[0])  # two live keys: H = ln 2, beta = 1
    assert torch.equal(out[1], logits[1])  # an all-masked row stays as it was


def test_low_precision_logits_get_the_float32_beta():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 20, generator=g)
    low = adaptive_temperature(logits.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), adaptive_temperature(logits), rtol=2e-2, atol=2e-2)


def test_two_class_softmaxes_are_never_changed():
    """The binary no-op, on every logit gap a float32 can hold (H from 0 up to ln 2 at a tie)."""
    gaps = torch.cat([torch.linspace(-30, 30, 60_001), torch.tensor([0.0, 1e-8, -1e-8])])
    logits = torch.stack([torch.zeros_like(gaps), gaps], dim=1)
    assert softmax_entropy(logits).max().item() == pytest.approx(np.log(2))
    assert torch.equal(adaptive_temperature(logits), logits)
    assert torch.equal(adaptive_probabilities(logits, "binary"), logits.softmax(dim=1))


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_adaptive_probabilities_are_scores_except_for_many_classes(task):
    g = torch.Generator().manual_seed(2)
    c = {TaskType.BINARY: 2, TaskType.MULTICLASS: 6, TaskType.ORDINAL: 5}.get(task, 4)
    logits = torch.randn(50, c, generator=g) * 0.5  # high-entropy outputs
    plain = logits.softmax(dim=1) if task.single_label else logits.sigmoid()
    got = adaptive_probabilities(logits, task)
    if task in (TaskType.BINARY, TaskType.MULTILABEL):
        assert torch.equal(got, plain)
    else:
        expected = torch.from_numpy(reference(logits.double().numpy())).softmax(dim=1)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        assert (got.max(dim=1).values > plain.max(dim=1).values).all()  # sharper
        assert torch.equal(got.argmax(dim=1), plain.argmax(dim=1))
