"""What every method's run guarantees: the source model untouched, modes, determinism, order."""

import copy

import numpy as np
import pytest
import torch

from clinadapt.tta import MODES, TTA_METHODS, create_tta

from .naive import tiny_batches, tiny_model

STATELESS = {"none", "bn", "lame"}
ADAPTING = {  # strong enough to show on three tiny batches
    "tent": {"lr": 2.0},
    "sar": {"lr": 2.0, "margin": 1.0},
    "eata": {"lr": 2.0, "margin": 1.0, "d_margin": 1.1},
}


def options(name):
    return ADAPTING.get(name, {})


def test_all_methods_are_registered_with_documented_options():
    import dataclasses

    assert TTA_METHODS.names() == ["bn", "eata", "lame", "none", "sar", "t3a", "tent"]
    for name in TTA_METHODS.names():
        cls = TTA_METHODS.get(name)
        assert cls.name == name and cls.description and cls.__module__.endswith(name)
        for f in dataclasses.fields(cls.config_cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


@pytest.mark.parametrize("name", sorted(TTA_METHODS.names()))
@pytest.mark.parametrize("mode", MODES)
def test_the_source_model_is_never_modified(name, mode):
    model, batches = tiny_model(), tiny_batches()
    model.features.bn2.train()  # a mode flag that must survive too
    before = copy.deepcopy(model.state_dict())
    flags = [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    result = create_tta(name, options(name)).run(model, batches, mode=mode)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    assert grads == [p.requires_grad for p in model.parameters()]
    assert not any(p.grad is not None for p in model.parameters())
    assert result.probabilities.shape == (24, 3) and result.examples == 24
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TTA_METHODS.names()))
def test_runs_are_deterministic_under_a_seed(name):
    model, batches = tiny_model(), tiny_batches()
    method = create_tta(name, options(name))
    first = method.run(model, batches, mode="continual", seed=3)
    second = method.run(model, batches, mode="continual", seed=3)
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    assert first.stats().keys() == second.stats().keys()


@pytest.mark.parametrize("name", sorted(TTA_METHODS.names()))
def test_episodic_and_continual_differ_only_for_methods_with_memory(name):
    model, batches = tiny_model(), tiny_batches()
    method = create_tta(name, options(name))
    episodic = method.run(model, batches, mode="episodic").probabilities
    continual = method.run(model, batches, mode="continual").probabilities
    np.testing.assert_allclose(episodic[:8], continual[:8], atol=1e-6)  # same first batch
    if name in STATELESS:
        np.testing.assert_allclose(episodic, continual, atol=1e-6)
    else:
        assert np.abs(episodic[8:] - continual[8:]).max() > 1e-4
    # episodic: each batch as if it were the only one
    alone = method.run(model, batches[2:], mode="episodic").probabilities
    np.testing.assert_allclose(episodic[16:], alone, atol=1e-6)


def test_episodic_tent_with_one_step_predicts_what_bn_predicts():
    model, batches = tiny_model(), tiny_batches()
    tent = create_tta("tent", {"lr": 2.0}).run(model, batches, mode="episodic")
    bn = create_tta("bn").run(model, batches)
    np.testing.assert_allclose(tent.probabilities, bn.probabilities, atol=1e-6)


def test_dropout_stays_off_while_norms_adapt():
    model = tiny_model()
    model.features = torch.nn.Sequential(model.features, torch.nn.Dropout(0.5))
    batches = tiny_batches()
    tent = create_tta("tent", {"lr": 2.0}).run(model, batches, mode="episodic", seed=1)
    bn = create_tta("bn").run(model, batches)
    np.testing.assert_allclose(tent.probabilities, bn.probabilities, atol=1e-6)


def test_a_trailing_single_image_joins_the_batch_before_it():
    model = tiny_model()
    batches = tiny_batches(n=2, size=5)
    split = [batches[0], batches[1][:4], batches[1][4:]]
    joined = create_tta("bn").run(model, split)
    whole = create_tta("bn").run(model, batches)
    assert joined.batches == 2 and joined.examples == 10
    np.testing.assert_allclose(joined.probabilities, whole.probabilities, atol=1e-6)
    # methods that do not estimate batch statistics keep the batches as given
    assert create_tta("lame").run(model, split).batches == 3


def test_stats_are_plain_values_for_the_record():
    import json

    result = create_tta("sar").run(tiny_model(), tiny_batches())
    stats = result.stats()
    assert {"method", "mode", "seed", "options", "adapted", "filtered", "resets", "collapses"} <= (
        stats.keys()
    )
    assert stats["options"]["rho"] == 0.05 and stats["seconds"] > 0
    json.dumps(stats)


def test_gradient_methods_run_inside_inference_mode():
    model, batches = tiny_model(), tiny_batches()
    expected = create_tta("tent", {"lr": 2.0}).run(model, batches, mode="continual")
    with torch.inference_mode():
        inside = [x.clone() for x in batches]
        result = create_tta("tent", {"lr": 2.0}).run(model, inside, mode="continual")
    np.testing.assert_array_equal(result.probabilities, expected.probabilities)


@pytest.mark.parametrize("name", sorted(TTA_METHODS.names()))
def test_batch_statistics_on_initial_batch_norms_warn(name):
    import warnings

    from clinadapt.errors import BatchStatisticsWarning

    folded, trained = tiny_model(), tiny_model()
    for bn in (folded.features.bn1, folded.features.bn2):
        bn.reset_running_stats()  # mean 0, variance 1: what folded TFLite weights hold
    method = create_tta(name, options(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = method.run(folded, tiny_batches())
        quiet = method.run(trained, tiny_batches())
    warned = [w for w in caught if issubclass(w.category, BatchStatisticsWarning)]
    uses_batch_statistics = name in {"bn", "tent", "sar", "eata"}
    assert len(warned) == uses_batch_statistics
    assert result.details.get("batch_norm_statistics") == ("initial" if warned else None)
    assert "batch_norm_statistics" not in quiet.details
    if warned:
        assert "tinynet" in str(warned[0].message) and "'t3a'" in str(warned[0].message)
