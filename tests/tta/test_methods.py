"""Each method against its naive re-implementation (naive.py) on a tiny batch-norm net."""

import math

import numpy as np
import pytest
import torch

from clinadapt.tta import create_tta

from .naive import (
    entropy,
    forward,
    naive_bn,
    naive_eata,
    naive_lame,
    naive_sar,
    naive_t3a,
    naive_tent,
    tiny_batches,
    tiny_model,
)

BATCH = 8


def stacked(parts):
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


def source_entropy_fraction(model, batch, quantile=0.5):
    """A margin (fraction of ln C) that about ``quantile`` of the batch's samples pass."""
    with torch.no_grad():
        ent = entropy(forward(model, batch)[0])
    return float(torch.quantile(ent, quantile)) / math.log(model.head.out_features)


@pytest.mark.parametrize("prior", [0.0, 16.0])
def test_bn_normalises_with_the_batch_statistics(prior):
    model, batches = tiny_model(), tiny_batches()
    result = create_tta("bn", {"prior": prior}).run(model, batches, mode="continual")
    expected = stacked(naive_bn(model, batches, prior=prior))
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    source = create_tta("none").run(model, batches).probabilities
    assert np.abs(result.probabilities - source).max() > 0.05  # the statistics matter here


@pytest.mark.parametrize(("mode", "steps"), [("continual", 1), ("episodic", 2)])
def test_tent_takes_the_sgd_steps_of_the_entropy_by_hand(mode, steps):
    model, batches = tiny_model(), tiny_batches()
    lr = 2.0
    result = create_tta("tent", {"lr": lr, "steps": steps}).run(model, batches, mode=mode)
    expected = stacked(
        naive_tent(model, batches, lr * BATCH / 64, steps=steps, continual=mode == "continual")
    )
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    bn = naive_bn(model, batches)
    assert np.abs(result.probabilities[BATCH:] - stacked(bn[1:])).max() > 1e-3
    assert result.updates == steps * len(batches) and result.adapted == BATCH * len(batches)
    assert result.details["lr"] == pytest.approx(lr * BATCH / 64)


def test_sar_filters_reliable_samples_and_takes_the_sam_step_by_hand():
    model, batches = tiny_model(), tiny_batches()
    margin = source_entropy_fraction(model, batches[0], quantile=0.6)
    options = {"lr": 2.0, "margin": margin, "rho": 0.05, "reset_below": 0.0}
    result = create_tta("sar", options).run(model, batches, mode="continual")
    nats = margin * math.log(3)
    probs, masks, _ = naive_sar(model, batches, 2.0 * BATCH / 64, nats, 0.05, 0.0)
    np.testing.assert_allclose(result.probabilities, stacked(probs), atol=1e-5)
    passed = sum(int(m.sum()) for m in masks)
    assert 0 < int(masks[0].sum()) < BATCH  # the filter does select
    assert (result.adapted, result.filtered) == (passed, len(batches) * BATCH - passed)
    assert np.abs(result.probabilities[BATCH:] - stacked(naive_bn(model, batches[1:]))).max() > 1e-3


def test_sar_resets_to_the_source_when_the_loss_average_collapses():
    model, batches = tiny_model(), tiny_batches(n=4)
    options = {"lr": 2.0, "margin": 1.0, "reset_below": 1.0}  # every loss counts as collapse
    continual = create_tta("sar", options).run(model, batches, mode="continual")
    episodic = create_tta("sar", options).run(model, batches, mode="episodic")
    _, _, resets = naive_sar(model, batches, 2.0 * BATCH / 64, math.log(3), 0.05, math.log(3))
    assert continual.collapses == resets == len(batches) and continual.resets == 0
    np.testing.assert_allclose(continual.probabilities, episodic.probabilities, atol=1e-6)


def test_eata_filters_by_entropy_then_redundancy_and_weights_by_hand():
    model, batches = tiny_model(), tiny_batches()
    margin = source_entropy_fraction(model, batches[0], quantile=0.75)
    nats, lr = margin * math.log(3), 2.0 * BATCH / 64
    cosines = []
    naive_eata(model, batches[:2], lr, nats, d_margin=2.0, record=cosines)
    middle = torch.sort(cosines[0]).values[len(cosines[0]) // 2 - 1 :][:2]
    d_margin = float(middle.mean())  # between two cosines: about half of batch 2 passes
    probs, masks = naive_eata(model, batches, lr, nats, d_margin)
    options = {"lr": 2.0, "margin": margin, "d_margin": d_margin}
    result = create_tta("eata", options).run(model, batches, mode="continual")
    np.testing.assert_allclose(result.probabilities, stacked(probs), atol=1e-5)
    reliable_2 = forward_entropy_below(model, batches[1], probs[1], nats)
    assert 0 < int(masks[1].sum()) < reliable_2  # the redundancy filter does select
    passed = sum(int(m.sum()) for m in masks)
    assert (result.adapted, result.filtered) == (passed, len(batches) * BATCH - passed)


def forward_entropy_below(model, batch, probs, nats):
    p = torch.as_tensor(probs)
    return int((-(p * torch.log(p)).sum(1) < nats).sum())


@pytest.mark.parametrize("mode", ["continual", "episodic"])
@pytest.mark.parametrize("filter_k", [2, None])
def test_t3a_prototypes_follow_the_filtered_supports_by_hand(mode, filter_k):
    model, batches = tiny_model(), tiny_batches()
    result = create_tta("t3a", {"filter_k": filter_k}).run(model, batches, mode=mode)
    expected = naive_t3a(model, batches, filter_k or 10**6, continual=mode == "continual")
    np.testing.assert_allclose(result.probabilities, stacked(expected), atol=1e-5)
    if filter_k:
        assert result.filtered > 0 and result.adapted + result.filtered == 3 * BATCH


@pytest.mark.parametrize("knn", [1, 3])
def test_lame_reaches_the_fixed_point_computed_by_hand(knn):
    model, batches = tiny_model(), tiny_batches(size=12)
    result = create_tta("lame", {"knn": knn, "max_steps": 1000}).run(model, batches)
    expected = stacked(naive_lame(model, batches, knn))
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-4)
    source = create_tta("none").run(model, batches).probabilities
    assert np.abs(result.probabilities - source).max() > 0.05
