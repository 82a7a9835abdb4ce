"""Bad input fails with a message that says what the method needs; divergence resets, never NaN."""

import numpy as np
import pytest
import torch
from torch import nn

from clinadapt.errors import ClinadaptError, ConfigError, DataError, UnknownNameError
from clinadapt.tta import TTAModel, create_tta

from .naive import naive_bn, tiny_batches, tiny_model

NORM_METHODS = ["bn", "tent", "sar", "eata"]


def no_norm_model():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return TTAModel(features, nn.Linear(4, 3), name="plain_cnn")


def layer_norm_model():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Flatten(), nn.Linear(108, 8), nn.LayerNorm(8))
    return TTAModel(features, nn.Linear(8, 3), name="ln_mlp")


@pytest.mark.parametrize("name", NORM_METHODS)
def test_a_model_without_normalisation_layers_is_refused_by_name(name):
    needs = "statistics of batch-norm layers" if name == "bn" else "affine parameters"
    with pytest.raises(ClinadaptError, match=f"{name} .*{needs}.*plain_cnn has none"):
        create_tta(name).run(no_norm_model(), tiny_batches())


@pytest.mark.parametrize("name", ["none", "t3a", "lame"])
def test_output_level_methods_need_no_normalisation_layers_and_take_single_images(name):
    result = create_tta(name).run(no_norm_model(), tiny_batches())
    assert np.isfinite(result.probabilities).all()
    single = create_tta(name).run(tiny_model(), [x[:1] for x in tiny_batches()])
    assert single.batches == 3 and np.isfinite(single.probabilities).all()


def test_layer_norms_adapt_with_tent_at_batch_size_one_but_bn_needs_batch_norms():
    model, batches = layer_norm_model(), [x[:1] for x in tiny_batches()]
    result = create_tta("tent", {"lr": 5.0}).run(model, batches, mode="continual")
    assert result.batches == 3 and result.updates == 3
    source = create_tta("none").run(model, batches).probabilities
    assert np.abs(result.probabilities[1:] - source[1:]).max() > 1e-4
    with pytest.raises(ClinadaptError, match="bn re-estimates.*ln_mlp has none"):
        create_tta("bn").run(model, batches)


@pytest.mark.parametrize("name", NORM_METHODS)
def test_batch_size_one_with_batch_norm_statistics_is_refused(name):
    batches = [x[:1] for x in tiny_batches()]
    with pytest.raises(ConfigError, match="at least 2 images per batch, got 1.*prior > 0"):
        create_tta(name).run(tiny_model(), batches)


def test_bn_with_a_source_prior_is_the_fallback_for_batch_size_one():
    model, batches = tiny_model(), [x[:1] for x in tiny_batches()]
    result = create_tta("bn", {"prior": 16}).run(model, batches)
    expected = np.concatenate([p.numpy() for p in naive_bn(model, batches, prior=16.0)])
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)


class Fragile(nn.Module):
    """The tiny net, made to break as soon as its first norm's scale leaves the source value:
    ``outputs`` turn NaN, or (``gradients``) the outputs stay finite but the gradient is NaN."""

    def __init__(self, net: nn.Module, breaks: str) -> None:
        super().__init__()
        self.net, self.breaks = net, breaks
        self.register_buffer("source", net.bn1.weight.detach().clone())

    def forward(self, x):
        out = self.net(x)
        moved = self.net.bn1.weight - self.source
        if self.breaks == "outputs":
            return out + torch.where(moved.abs().sum() > 0, float("nan"), 0.0)
        return out + 0 * torch.sqrt(moved).sum()  # d/dw sqrt(0) = inf: NaN gradient


@pytest.mark.parametrize("breaks", ["outputs", "gradients"])
@pytest.mark.parametrize("name", ["tent", "sar", "eata"])
def test_divergence_resets_to_the_source_and_is_counted(name, breaks):
    model, batches = tiny_model(), tiny_batches(n=4)
    fragile = TTAModel(Fragile(model.features, breaks), model.head, name="fragile")
    options = {"lr": 2.0} | ({"margin": 1.0} if name != "tent" else {})
    options |= {"d_margin": 1.1} if name == "eata" else {}
    result = create_tta(name, options).run(fragile, batches, mode="continual")
    if name == "sar":  # NaN entropies at the SAM point fail its filter: it never steps
        assert (result.resets, result.updates) == (0, 0)
    else:  # outputs: batches 2-4 come out NaN, are reset and predicted again from the source
        # state; gradients: every update leaves NaN parameters and is undone
        assert result.resets == (3 if breaks == "outputs" else 4)
    assert np.isfinite(result.probabilities).all()
    assert result.adapted + result.filtered == result.examples  # a retried batch counts once
    bn = np.concatenate([p.numpy() for p in naive_bn(model, batches)])
    np.testing.assert_allclose(result.probabilities, bn, atol=1e-5)


def test_a_model_that_fails_from_its_source_state_is_an_error():
    model = tiny_model()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ClinadaptError, match="tinynet gives non-finite outputs on test batch 0"):
        create_tta("tent").run(model, tiny_batches())


def test_non_finite_pixels_and_empty_streams_are_data_errors():
    batches = tiny_batches()
    batches[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="test batch 1 .*non-finite"):
        create_tta("none").run(tiny_model(), batches)
    with pytest.raises(DataError, match="no test images"):
        create_tta("none").run(tiny_model(), [])
    with pytest.raises(DataError, match="test batch 0 must be a non-empty tensor"):
        create_tta("none").run(tiny_model(), [np.zeros((2, 3, 6, 6))])


def test_eata_fisher_term_needs_source_images():
    model, batches = tiny_model(), tiny_batches()
    with pytest.raises(ConfigError, match="needs source images"):
        create_tta("eata", {"fisher_alpha": 2000}).run(model, batches)
    with pytest.raises(ConfigError, match="does not use source images"):
        create_tta("tent").run(model, batches, source=batches)
    options = {"lr": 2.0, "margin": 1.0, "d_margin": 1.1}
    plain = create_tta("eata", options).run(model, batches, mode="continual")
    anchored = create_tta("eata", options | {"fisher_alpha": 1e6}).run(
        model, batches, mode="continual", source=tiny_batches(n=2, seed=7)
    )
    assert anchored.details["fisher_images"] == 16
    np.testing.assert_allclose(anchored.probabilities[:16], plain.probabilities[:16], atol=1e-6)
    assert np.abs(anchored.probabilities[16:] - plain.probabilities[16:]).max() > 1e-4


def test_unknown_names_options_and_modes_suggest_the_right_one():
    with pytest.raises(UnknownNameError, match="Did you mean 'tent'"):
        create_tta("tnet")
    with pytest.raises(ConfigError, match="unknown option 'step'.*'steps'"):
        create_tta("tent", {"step": 2})
    with pytest.raises(ConfigError, match="Did you mean 'episodic'"):
        create_tta("none").run(tiny_model(), tiny_batches(), mode="episodc")
    with pytest.raises(ClinadaptError, match="expected a TTAModel"):
        create_tta("none").run(nn.Linear(2, 2), tiny_batches())


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("tent", {"lr": 0}, "lr must be positive"),
        ("tent", {"steps": 0}, "steps must be positive"),
        ("sar", {"margin": -1}, "margin must be positive"),
        ("sar", {"reset_below": -0.1}, "reset_below"),
        ("eata", {"d_margin": 0}, "d_margin"),
        ("eata", {"fisher_alpha": -1}, "fisher_alpha"),
        ("bn", {"prior": -1}, "prior"),
        ("t3a", {"filter_k": 0}, "filter_k"),
        ("lame", {"knn": 0}, "knn"),
        ("lame", {"max_steps": "many"}, "integer"),
    ],
)
def test_invalid_options_are_config_errors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        create_tta(name, options)
