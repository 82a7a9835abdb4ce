"""TTAModel from a fine-tuned AdaptedModel and from a frozen backbone with a linear probe."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from clinadapt.adapt import AdaptedModel, create_method
from clinadapt.backbones import create_backbone
from clinadapt.errors import ClinadaptError
from clinadapt.tta import TTAModel, create_tta

from .naive import TinyNet, tiny_batches


def test_from_adapted_computes_the_adapted_models_logits_and_adapts_a_copy():
    torch.manual_seed(0)
    model = create_method("lora").apply(AdaptedModel(create_backbone("test_cnn", "none"), 3))
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    wrapped = TTAModel.from_adapted(model)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = create_tta("tent").run(wrapped, [x, x + 1], mode="continual")
    assert result.probabilities.shape == (8, 3) and wrapped.name == "test_cnn"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.frozen_norms  # the source keeps its frozen norms, in eval mode
    assert not any(model.get_submodule(n).training for n in model.frozen_norms)


def test_from_adapted_refuses_other_tasks():
    model = AdaptedModel(create_backbone("test_cnn", "none"), 3)
    model.task = "segmentation"
    with pytest.raises(ClinadaptError, match="applies to classifiers"):
        TTAModel.from_adapted(model)


@pytest.mark.parametrize("classes", [2, 3])
def test_from_linear_probe_gives_the_probes_probabilities(classes):
    torch.manual_seed(0)
    net = TinyNet().eval()
    batches = tiny_batches(n=2, size=12)
    with torch.no_grad():
        features = torch.cat([net(x) for x in batches]).numpy()
    labels = np.arange(len(features)) % classes
    scaler = StandardScaler().fit(features)
    probe = LogisticRegression().fit(scaler.transform(features), labels)
    model = TTAModel.from_linear_probe(
        net, probe.coef_, probe.intercept_, scaler.mean_, scaler.scale_, name="tiny"
    )
    assert model.head.out_features == classes and model.name == "tiny"
    result = create_tta("none").run(model, batches)
    expected = probe.predict_proba(scaler.transform(features))
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    if classes == 2:  # the two prototypes point apart, as T3A needs
        torch.testing.assert_close(model.head.weight[0], -model.head.weight[1])
    assert np.isfinite(create_tta("t3a").run(model, batches).probabilities).all()


def test_from_linear_probe_checks_shapes():
    with pytest.raises(ClinadaptError, match=r"coef of shape \(C, D\)"):
        TTAModel.from_linear_probe(nn.Identity(), np.zeros(4), np.zeros(1))
    with pytest.raises(ClinadaptError, match="both mean and scale"):
        TTAModel.from_linear_probe(nn.Identity(), np.zeros((1, 4)), np.zeros(1), np.zeros(4))
    with pytest.raises(ClinadaptError, match="3 means and 3 scales for 4 features"):
        TTAModel.from_linear_probe(
            nn.Identity(), np.zeros((1, 4)), np.zeros(1), np.zeros(3), np.ones(3)
        )
    with pytest.raises(ClinadaptError, match="linear classification head"):
        TTAModel(nn.Identity(), nn.Sequential(nn.Linear(2, 2)))
