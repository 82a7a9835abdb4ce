"""The parts of locked-text alignment: pooling classes of several datasets (one class only when
the text is the same), the symmetric contrastive loss against a naive formula, the projection
folded onto raw features, and the text side written and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from torch.nn import functional as F

from clinadapt.backbones.text_side import TextEncoder
from clinadapt.data.class_text import parse_class_text
from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.text import align, encoders
from clinadapt.text.align import (
    AlignSettings,
    contrastive_loss,
    load_text_side,
    make_projector,
    pool_classes,
    prompt_bank,
    save_text_side,
    train_projector,
)


def text(name: str, labels: dict[str, str], template: str):
    info = DatasetInfo(name, TaskType.MULTICLASS, tuple(labels), 1, 2)
    record = {"templates": [template], "classes": {k: {"name": v} for k, v in labels.items()}}
    return parse_class_text(record, info, name)


class Hashing(TextEncoder):
    def __init__(self, weights_id: str = "w1") -> None:
        super().__init__("hashing", 8, weights_id)

    def _embed(self, texts):
        return torch.stack(
            [
                torch.randn(8, generator=torch.Generator().manual_seed(sum(map(ord, t))))
                for t in texts
            ]
        )


def test_classes_merge_only_when_their_text_is_the_same():
    chest = text("chest", {"normal": "normal", "pneumonia": "pneumonia"}, "a chest X-ray of {}.")
    breast = text("breast", {"normal": "normal", "malignant": "cancer"}, "an ultrasound of {}.")
    other_chest = text("chest2", {"0": "normal", "1": "pneumonia"}, "a chest X-ray of {}.")
    pooled = pool_classes({"chest": chest, "breast": breast, "chest2": other_chest}, "names")
    assert pooled.keys == (
        "chest:normal+chest2:0",
        "chest:pneumonia+chest2:1",
        "breast:normal",
        "breast:malignant",
    )
    assert pooled.index["chest"].tolist() == [0, 1] and pooled.index["chest2"].tolist() == [0, 1]
    assert pooled.index["breast"].tolist() == [2, 3]
    assert pooled.prompts[2] == ("an ultrasound of normal.",)
    assert pooled.describe()["merged"] == ["chest:normal+chest2:0", "chest:pneumonia+chest2:1"]


def test_contrastive_loss_matches_the_naive_formula():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    t = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    y = torch.tensor([0, 2, 2, 1, 0, 2])
    scale = torch.tensor(7.0)
    logits = 7.0 * (z @ t.T).numpy()
    i2t = -np.mean(np.log(softmax(logits, axis=1))[np.arange(6), y.numpy()])
    t2i = []
    for c in (0, 1, 2):  # class 3 has no image in the batch
        log_p = logits[:, c] - logsumexp(logits[:, c])
        t2i.append(-logsumexp(log_p[y.numpy() == c]))
    expected = (i2t + np.mean(t2i)) / 2
    np.testing.assert_allclose(float(contrastive_loss(z, t, y, scale)), expected, rtol=1e-5)


def settings(**kw):
    base = dict(epochs=30, batch_size=16, lr=1e-2, weight_decay=0.0, logit_scale=10.0)
    return AlignSettings(**{**base, "learn_scale": True, "seed": 0, **kw})


def test_projection_learns_the_classes_and_folds_onto_raw_features():
    rng = np.random.default_rng(0)
    y = torch.from_numpy(np.arange(60) % 3)
    x = torch.from_numpy(rng.normal(size=(60, 12)) * 0.5 + 5.0).float()
    x[torch.arange(60), y] += 4.0  # class c raises feature c
    g = torch.Generator().manual_seed(1)
    # two wordings per class: near each other, far from the other classes
    bank = [
        F.normalize(3 * torch.randn(8, generator=g) + torch.randn(2, 8, generator=g), dim=1)
        for _ in range(3)
    ]
    projector = make_projector(x, 8, settings())

    def batches(generator):
        order = torch.randperm(60, generator=generator)
        for i in range(0, 60, 16):
            yield x[order[i : i + 16]], y[order[i : i + 16]]

    history = train_projector(
        projector, batches, bank, settings(), monitor=lambda: {"m": 1.0}, progress=False
    )
    assert len(history) == 30 and history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["m"] == 1.0 and history[-1]["logit_scale"] != 10.0
    folded = projector.folded()
    projector.eval()
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(folded(x), dim=1), projector(x))
        classes = torch.stack([F.normalize(b.mean(0), dim=0) for b in bank])
        accuracy = ((projector(x) @ classes.T).argmax(1) == y).float().mean()
    assert accuracy > 0.9
    fixed = make_projector(x, 8, settings(learn_scale=False))
    train_projector(fixed, batches, bank, settings(epochs=1, learn_scale=False), progress=False)
    assert float(fixed.scale) == pytest.approx(10.0)


def test_divergence_is_reported():
    x = torch.full((4, 3), float("nan"))
    projector = make_projector(torch.ones(4, 3), 8, settings())
    bank = [F.normalize(torch.ones(1, 8), dim=1), F.normalize(-torch.ones(1, 8), dim=1)]
    with pytest.raises(ClinadaptError, match="diverged"):
        train_projector(
            projector,
            lambda g: iter([(x, torch.tensor([0, 1, 0, 1]))]),
            bank,
            settings(),
            progress=False,
        )


def test_text_side_round_trip_and_its_checks(tmp_path, monkeypatch):
    encoder = Hashing()
    monkeypatch.setitem(encoders._LOADED, "hashing-test", encoder)
    chest = text("chest", {"a": "x", "b": "y"}, "an image of {}.")
    bank = prompt_bank(encoder.encode, pool_classes({"chest": chest}, "names"))
    torch.testing.assert_close(bank[1], encoder.encode(["an image of y."]))
    projection = torch.nn.Linear(5, 8)
    save_text_side(tmp_path, projection, 12.5, "hashing-test", encoder, {"datasets": ["chest"]})
    assert align.has_text_side(tmp_path) and not align.has_text_side(tmp_path / "other")
    space = load_text_side(tmp_path, image_dim=5)
    assert space.text is encoder and space.logit_scale == 12.5 and space.dim == 8
    x = torch.randn(3, 5)
    torch.testing.assert_close(space.project_image(x), F.normalize(projection(x), dim=1))
    spec = json.loads((tmp_path / align.TEXT_SIDE_FILE).read_text())
    assert spec["aligned_on"] == {"datasets": ["chest"]} and spec["text_encoder_weights_id"] == "w1"
    with pytest.raises(ConfigError, match="takes 5 features, the backbone gives 7"):
        load_text_side(tmp_path, image_dim=7)
    monkeypatch.setitem(encoders._LOADED, "hashing-test", Hashing("w2"))
    with pytest.raises(ConfigError, match="installed one has w2"):
        load_text_side(tmp_path, image_dim=5)
    (tmp_path / align.TEXT_SIDE_FILE).write_text("{")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_text_side(tmp_path, image_dim=5)
