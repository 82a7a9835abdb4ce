"""The text side of a vision-language backbone: texts and image features in one joint space.

``TextEncoder`` is the one protocol every text encoder follows (a CLIP text tower here,
sentence-transformers models in ``clinadapt.text``): ``encode(texts) -> (n, d)`` L2-normalised,
batched, without gradients, and cached per text set. ``JointSpace`` is what vision-language
methods use: ``encode_text`` (normalised, joint space), ``project_image`` (cached backbone
features to normalised joint space) and ``logit_scale``. A CLIP model's image features already
live in its joint space, so its projection is the identity; a backbone aligned to a separate text
encoder (LiT-style) carries a learned projection instead.

Prompt learning (CoOp and its kin) needs one step more than ``encode``: texts as token ids, the
encoder's input embedding of each token, and the encoder run on input embeddings some of which
are learned. Encoders that allow it implement three methods: ``tokenize(texts) -> Tokens``,
``input_embeddings(tokens) -> (n, L, width)`` and ``encode_embeddings(tokens, embeddings) ->
(n, dim)`` (raw, differentiable in ``embeddings``); ``encode_embeddings(t, input_embeddings(t))``
is ``encode``'s result before normalisation. The open_clip towers do it by replacing the output
of their token-embedding layer during an ordinary ``encode_text`` (every tower kind then pools,
masks and projects as it always does); sentence-transformers models pass ``inputs_embeds`` to
their Hugging Face model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clinadapt.errors import ConfigError, DataError

TEXT_BATCH = 64
CACHED_TEXT_SETS = 32
"""Text sets kept per encoder: a run asks for the same class prompts several times."""


class TextEncoder(ABC):
    """Sentence embeddings: ``encode(texts) -> (len(texts), dim)`` float32 on the CPU, rows of unit
    length. ``name`` says which encoder and ``weights_id`` which weights (records, cache keys)."""

    def __init__(self, name: str, dim: int, weights_id: str, batch_size: int = TEXT_BATCH) -> None:
        self.name = name
        self.dim = dim
        self.weights_id = weights_id
        self.batch_size = batch_size
        self._cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()

    @abstractmethod
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Raw embeddings (any scale) of one batch; called under ``torch.no_grad``."""

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        key = tuple(check_texts(texts))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].clone()
        with torch.no_grad():
            parts = [
                self._embed(list(key[i : i + self.batch_size]))
                for i in range(0, len(key), self.batch_size)
            ]
        out = F.normalize(torch.cat(parts).detach().float().cpu(), dim=-1)
        self._cache[key] = out
        while len(self._cache) > CACHED_TEXT_SETS:
            self._cache.popitem(last=False)
        return out.clone()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weights_id": self.weights_id, "dim": self.dim}

    # Token-level access, for prompt learning. Encoders without it keep these defaults.
    token_width: int = 0
    """Width of the encoder's input token embeddings (0: no token-level access)."""

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """The texts as the encoder's token ids (position 0 is its start token)."""
        raise self._no_tokens()

    def input_embeddings(self, tokens: Tokens) -> torch.Tensor:
        """(n, L, token_width) input embeddings of the tokens, without gradients."""
        raise self._no_tokens()

    def encode_embeddings(self, tokens: Tokens, embeddings: torch.Tensor) -> torch.Tensor:
        """(n, dim) raw text embeddings with ``embeddings`` in place of the tokens' own input
        embeddings; gradients flow to ``embeddings``."""
        raise self._no_tokens()

    def _no_tokens(self) -> ConfigError:
        return ConfigError(
            f"text encoder {self.name!r} gives no token-level access, which prompt learning "
            "(coop, cocoop, dapl) needs; use an open_clip text tower or a sentence-transformers "
            "encoder (minilm)"
        )


@dataclass(frozen=True)
class Tokens:
    """Token ids (n, L) and what else the encoder's model takes with them (attention masks)."""

    ids: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def check_texts(texts: Sequence[str]) -> list[str]:
    """A non-empty list of non-empty strings."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise DataError(f"texts must be a non-empty list of strings, got {texts!r:.80}")
    bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
    if bad:
        raise DataError(f"texts must be non-empty strings, got {bad[0]!r}")
    return list(texts)


class OpenClipText(TextEncoder):
    """The text tower of an open_clip model (``CLIP`` or ``CustomTextCLIP``, e.g. BiomedCLIP's
    PubMedBERT) with its tokenizer; texts longer than the context are truncated by it."""

    def __init__(self, clip: nn.Module, tokenizer: Any, name: str, weights_id: str) -> None:
        clip.eval().requires_grad_(False)
        super().__init__(name, text_projection_dim(clip), weights_id)
        self.clip = clip
        self.tokenizer = tokenizer

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(self.tokenize(texts).ids)

    @property
    def token_width(self) -> int:  # type: ignore[override]
        return int(self._token_layer().embedding_dim)

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        device = self._token_layer().weight.device
        return Tokens(self.tokenizer(check_texts(texts)).to(device))

    def input_embeddings(self, tokens: Tokens) -> torch.Tensor:
        with torch.no_grad():
            return self._token_layer()(tokens.ids).float()

    def encode_embeddings(self, tokens: Tokens, embeddings: torch.Tensor) -> torch.Tensor:
        layer = self._token_layer()
        with _replaced_output(layer, embeddings.to(layer.weight.dtype)):
            return self.clip.encode_text(tokens.ids).float()

    def _token_layer(self) -> nn.Embedding:
        """The tower's token-embedding table: on the model (CLIP), on its text tower
        (``CustomTextCLIP``), or inside the Hugging Face model of an ``HFTextEncoder``."""
        tower = getattr(self.clip, "text", self.clip)
        layer = getattr(tower, "token_embedding", None)
        if layer is None and hasattr(tower, "transformer"):
            layer = tower.transformer.get_input_embeddings()
        if not isinstance(layer, nn.Embedding):
            raise self._no_tokens()
        return layer


@contextmanager
def _replaced_output(layer: nn.Module, output: torch.Tensor) -> Iterator[None]:
    """While open, ``layer`` returns ``output`` (whose shape must be what it would return)."""

    def hook(module: nn.Module, args: Any, result: torch.Tensor) -> torch.Tensor:
        if result.shape != output.shape:
            raise DataError(
                f"embeddings of shape {tuple(output.shape)} do not fit tokens embedded as "
                f"{tuple(result.shape)}"
            )
        return output

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def text_projection_dim(clip: nn.Module) -> int:
    """The joint-space width of an open_clip model (its ``embed_dim``)."""
    return int(clip.visual.output_dim)


class JointSpace:
    """Image features and texts compared by cosine similarity, scaled by ``logit_scale``.

    Not an ``nn.Module`` on purpose: a backbone carries it beside its image model, so the text
    tower never counts among the backbone's parameters, trains with it or moves with it.
    """

    def __init__(
        self,
        text: TextEncoder,
        logit_scale: float,
        image_dim: int,
        projection: nn.Module | None = None,
    ) -> None:
        if not logit_scale > 0:
            raise ConfigError(f"logit_scale must be positive, got {logit_scale}")
        self.text = text
        self.logit_scale = float(logit_scale)
        self.image_dim = image_dim
        self.projection = None if projection is None else projection.eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.text.dim

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim) unit rows in the joint space."""
        return self.text.encode(texts)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """(N, image_dim) backbone features -> (N, dim) unit rows in the joint space."""
        x = torch.as_tensor(features).float()
        if x.ndim != 2 or x.shape[1] != self.image_dim:
            raise DataError(
                f"image features of shape {tuple(x.shape)} do not fit this text side, which "
                f"takes (N, {self.image_dim}) backbone features"
            )
        if self.projection is not None:
            with torch.no_grad():
                param = next(self.projection.parameters(), None)
                x = self.projection(x.to(param.device if param is not None else "cpu")).cpu()
        if x.shape[1] != self.dim:
            raise DataError(
                f"projected image features have {x.shape[1]} dimensions, texts {self.dim}"
            )
        return F.normalize(x.float(), dim=-1)

    def describe(self) -> dict[str, Any]:
        return {
            "encoder": self.text.describe(),
            "logit_scale": self.logit_scale,
            "image_projection": "identity" if self.projection is None else "learned",
        }
