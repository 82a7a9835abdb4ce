"""open_clip backbones with both towers: the image tower becomes the backbone's model, the text
tower its ``JointSpace``.

Weights come from open_clip's hub tags (``clip_vitb16``: ``ViT-B-16/openai``), a Hugging Face
hub repo (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``), or a local folder
holding open_clip's ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and a
safetensors file: the folder's config builds the model, so any architecture open_clip can build
works offline. A state dict with only ``visual.*`` weights (an exported image tower) gives a
backbone without a text side.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clinadapt.backbones.base import PretrainedConfig
from clinadapt.backbones.hub import download
from clinadapt.backbones.registry import BackboneSpec, import_open_clip, pretrained_config
from clinadapt.backbones.text_side import JointSpace, OpenClipText
from clinadapt.backbones.weights import (
    LocalWeights,
    file_sha256,
    load_checked,
    read_state_dict,
    resolve_local_weights,
)
from clinadapt.errors import ClinadaptError, ConfigError

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "model.safetensors")
LOCAL_DIR = "local-dir:"


def is_open_clip_folder(path: str | Path) -> bool:
    """A folder in open_clip's own layout (its config beside the weights)."""
    return (Path(path).expanduser() / CONFIG_FILE).is_file()


def create_open_clip(
    spec: BackboneSpec, weights: str, *, seed: int, trust_pickle: bool = False
) -> tuple[nn.Module, PretrainedConfig, str, JointSpace | None]:
    """(image tower, preprocessing, weights id, text side) of an open_clip backbone."""
    open_clip = import_open_clip()
    if weights == "pretrained":
        if not spec.model_name or not (spec.pretrained_tag or _schema(spec.model_name)):
            raise ConfigError(
                f"backbone {spec.name!r} names no pretrained weights: give a hub tag "
                "(open_clip:<arch>/<tag>, e.g. open_clip:ViT-B-16/openai), a hub repo "
                "(open_clip:hf-hub:<org>/<repo>), or --weights FOLDER with "
                f"{CONFIG_FILE} and a .safetensors file"
            )
        clip, tokenizer = download(
            spec.weights_ref,
            lambda: (
                open_clip.create_model(
                    spec.model_name, pretrained=spec.pretrained_tag or None, **spec.kwargs
                ),
                open_clip.get_tokenizer(spec.model_name),
            ),
        )
        cfg = (
            _preprocess_config(open_clip, clip, spec.weights_ref)
            if _schema(spec.model_name)
            else pretrained_config(spec)
        )
        return _parts(clip, tokenizer, cfg, spec.weights_ref, f"{spec.weights_ref} text tower")
    if weights == "none":
        if not spec.model_name:
            raise ConfigError(
                f"backbone {spec.name!r} is built from a local folder: pass --weights FOLDER "
                f"holding {CONFIG_FILE} and a .safetensors file"
            )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            with _quiet_random_init():
                clip, tokenizer = download(
                    spec.weights_ref,
                    lambda: (
                        open_clip.create_model(
                            spec.model_name,
                            load_weights=False,
                            pretrained_text=False,
                            **spec.kwargs,
                        ),
                        open_clip.get_tokenizer(spec.model_name),
                    ),
                )
        source = f"random (seed {seed})"
        cfg = (
            _preprocess_config(open_clip, clip, source)
            if _schema(spec.model_name)
            else pretrained_config(spec, source=source)
        )
        return _parts(clip, tokenizer, cfg, f"none-seed{seed}", f"{spec.name} random text tower")
    path = Path(weights).expanduser()
    if is_open_clip_folder(path):
        return _from_folder(open_clip, spec, path, trust_pickle)
    if not spec.model_name:
        raise ConfigError(
            f"{path}: backbone {spec.name!r} is built from an open_clip folder, and this one "
            f"has no {CONFIG_FILE}; add it (open_clip's model_cfg and preprocess_cfg) or name "
            "the architecture (open_clip:<arch>)"
        )
    return _from_state(open_clip, spec, resolve_local_weights(path), trust_pickle)


def _from_folder(
    open_clip: Any, spec: BackboneSpec, folder: Path, trust_pickle: bool
) -> tuple[nn.Module, PretrainedConfig, str, JointSpace | None]:
    """open_clip's local layout: the model from the folder's config, weights read safely."""
    config = folder / CONFIG_FILE
    try:
        model_cfg = json.loads(config.read_text(encoding="utf-8")).get("model_cfg")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{config} is not an open_clip config (JSON object): {err}") from None
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(
        model_cfg
    ):
        raise ConfigError(
            f"{config}: 'model_cfg' must hold embed_dim, vision_cfg and text_cfg (open_clip's "
            "model config)"
        )
    file = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if file is None:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise ClinadaptError(
            f"open_clip folder {folder} has no {' or '.join(WEIGHT_FILES)} (it holds {found}); "
            "convert the checkpoint to safetensors"
        )
    name = f"{LOCAL_DIR}{folder.resolve()}"
    try:
        with _quiet_random_init():
            clip = open_clip.create_model(name, load_weights=False, pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:
        raise ClinadaptError(
            f"cannot build the open_clip model of {config}: {err}. A Hugging Face text tower "
            "needs its config and tokenizer in the hub cache or the folder."
        ) from err
    load_checked(clip, read_state_dict(file, trust_pickle=trust_pickle), file, arch=str(config))
    cfg = _preprocess_config(open_clip, clip, str(file))
    return _parts(clip, tokenizer, cfg, file_sha256(file), f"open_clip text tower ({folder.name})")


def _from_state(
    open_clip: Any, spec: BackboneSpec, local: LocalWeights, trust_pickle: bool
) -> tuple[nn.Module, PretrainedConfig, str, JointSpace | None]:
    """A state dict for the spec's architecture: the whole model (both towers), or only the image
    tower (``visual.*`` keys or bare tower keys), which leaves no text side."""
    state = read_state_dict(local.file, trust_pickle=trust_pickle)
    kwargs = {**spec.kwargs, **local.create_kwargs}
    try:
        with _quiet_random_init():
            clip = open_clip.create_model(
                spec.model_name, load_weights=False, pretrained_text=False, **kwargs
            )
        tokenizer = open_clip.get_tokenizer(spec.model_name)
    except (TypeError, ValueError) as err:
        if not local.create_kwargs:
            raise
        raise local.rejected_kwargs(spec.model_name, err) from None
    cfg, weights_id = local.override(pretrained_config(spec)), file_sha256(local.file)
    whole = any(k.startswith("visual.") for k in state) and any(
        not k.startswith("visual.") for k in state
    )
    if whole:
        load_checked(clip, state, local.file, arch=spec.model_name)
        return _parts(clip, tokenizer, cfg, weights_id, f"{spec.name} text tower ({local.file})")
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items()}
    load_checked(clip.visual, state, local.file, arch=spec.model_name)
    return clip.visual, cfg, weights_id, None


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip warns "Model initialized randomly" when built without weights, which is what we
    ask for before loading the weights ourselves (or for the random control)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _parts(
    clip: nn.Module, tokenizer: Any, cfg: PretrainedConfig, weights_id: str, text_name: str
) -> tuple[nn.Module, PretrainedConfig, str, JointSpace]:
    clip.eval().requires_grad_(False)
    text = OpenClipText(clip, tokenizer, text_name, weights_id)
    scale = float(clip.logit_scale.exp()) if hasattr(clip, "logit_scale") else 100.0
    space = JointSpace(text, logit_scale=scale, image_dim=int(clip.visual.output_dim))
    return clip.visual, cfg, weights_id, space


def _preprocess_config(open_clip: Any, clip: nn.Module, source: str) -> PretrainedConfig:
    """What the model's own config says about its inputs (hub repos and folders carry it)."""
    pre = open_clip.get_model_preprocess_cfg(clip)
    size = pre.get("size", 224)
    defaults = PretrainedConfig()
    return PretrainedConfig(
        input_size=int(size if isinstance(size, int) else size[-1]),
        mean=tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=str(pre.get("interpolation", defaults.interpolation)),
        source=source,
    )


def _schema(model_name: str) -> bool:
    """A model named by where its config lives (``hf-hub:``), not by a built-in architecture."""
    return model_name.startswith(("hf-hub:", LOCAL_DIR))
