"""``create_backbone``: a frozen, classifier-free feature extractor from a name and weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from clinadapt.backbones import medmnist_nets
from clinadapt.backbones.base import Backbone, PretrainedConfig
from clinadapt.backbones.hub import download
from clinadapt.backbones.registry import BackboneSpec, get_spec, pretrained_config
from clinadapt.backbones.weights import (
    LocalWeights,
    file_sha256,
    load_checked,
    read_state_dict,
    resolve_local_weights,
)
from clinadapt.errors import ClinadaptError, ConfigError

RANDOM_INIT_SEED = 0
"""The untrained control is one fixed random initialisation, so its features are reproducible
and cacheable like any other weights."""


def create_backbone(
    name: str, weights: str = "pretrained", *, trust_pickle: bool = False
) -> Backbone:
    """Build backbone ``name`` with ``weights``: ``pretrained`` (hub, or the checkpoint bundled in
    the spec's ``weights_package``, also accepted by that name), ``none`` (random) or a path.

    The classifier is always removed so ``embed`` returns pooled features; the model is frozen
    (eval mode, no gradients). ``weights_id`` is the hub reference, ``none``, or the sha256 of
    the local weights file, so feature caches never mix weights.
    """
    spec = get_spec(name)
    text = None
    if spec.library == "open_clip":
        from clinadapt.backbones.clip import create_open_clip

        model, cfg, weights_id, text = create_open_clip(
            spec, weights, seed=RANDOM_INIT_SEED, trust_pickle=trust_pickle
        )
    elif spec.weights_package and weights in ("pretrained", spec.weights_package):
        model, cfg, weights_id = _packaged(spec)
    elif weights == "pretrained" and spec.library == "clinadapt":
        raise ClinadaptError(
            f"backbone {spec.name!r} has no pretrained weights: there are none published for this "
            "architecture (it is trained from scratch). Use --weights none for a random "
            "initialisation, or --weights PATH for a local .safetensors file."
        )
    elif weights == "pretrained":
        model = download(spec.weights_ref, lambda: _build(spec, spec.kwargs, pretrained=True))
        cfg, weights_id = pretrained_config(spec), spec.weights_ref
    elif weights == "none":
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _build(spec, spec.kwargs, pretrained=False)
        cfg = pretrained_config(spec, source=f"random (seed {RANDOM_INIT_SEED})")
        weights_id = f"none-seed{RANDOM_INIT_SEED}"
    else:
        local = resolve_local_weights(Path(weights).expanduser())
        _check_architecture(spec, local)
        state = read_state_dict(local.file, trust_pickle=trust_pickle)
        spec = replace(spec, kwargs={**spec.kwargs, **local.create_kwargs})
        try:
            model = _build(spec, spec.kwargs, pretrained=False)
        except (TypeError, ValueError) as err:
            if not local.create_kwargs:
                raise
            raise local.rejected_kwargs(spec.model_name, err) from None
        load_checked(
            model, state, local.file, arch=spec.model_name, drop_prefixes=_classifier_keys(model)
        )
        cfg, weights_id = local.override(pretrained_config(spec)), file_sha256(local.file)
    model.eval().requires_grad_(False)
    backbone = Backbone(
        name=spec.name,
        model=model,
        feature_dim=_feature_dim(model),
        pretrained_cfg=cfg,
        weights_id=weights_id,
        is_pretrained=weights != "none",
        model_kwargs=spec.kwargs,
        ndim=spec.ndim,
        text=text,
    )
    return backbone.eval()


def _build(spec: BackboneSpec, kwargs: dict[str, Any], *, pretrained: bool) -> nn.Module:
    """The bare model with no classifier (timm, clinadapt); open_clip models are built by
    ``backbones.clip`` with both towers."""
    if spec.library == "clinadapt":
        return medmnist_nets.create_model(spec.model_name, **{**kwargs, "num_classes": 0})
    name = spec.hub_name if pretrained else spec.model_name
    return timm.create_model(name, pretrained=pretrained, **{**kwargs, "num_classes": 0})


def _packaged(spec: BackboneSpec) -> tuple[nn.Module, PretrainedConfig, str]:
    """The model with the checkpoint that ``spec.weights_package`` ships (LiteMedSAM's, the only
    one): its source says which file and whether its sha256 is the published one."""
    from clinadapt.backbones.sam.loader import packaged_state

    state, info = packaged_state()
    model = _build(spec, spec.kwargs, pretrained=False)
    file = Path(info.file)
    load_checked(model, state, file, arch=spec.model_name, drop_prefixes=_classifier_keys(model))
    check = (
        f"sha256 verified: {info.description}"
        if info.verified
        else f"sha256 {info.sha256} unverified: not the published file"
    )
    return (
        model,
        pretrained_config(spec, source=f"{spec.weights_package} {file} ({check})"),
        info.sha256,
    )


def _check_architecture(spec: BackboneSpec, local: LocalWeights) -> None:
    arch = local.architecture
    if arch is None or arch == spec.model_name:
        return
    hint = f" (e.g. timm:{arch})" if timm.is_model(arch) else ""
    raise ConfigError(
        f"{local.config_file}: architecture {arch!r} does not match backbone {spec.name!r} "
        f"({spec.model_name!r}); choose the matching backbone{hint} or correct the architecture"
    )


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classifier that ``num_classes=0`` removed (named by timm)."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _feature_dim(model: nn.Module) -> int:
    """Width of the pooled output: open_clip's projection, else timm's pre-logits size."""
    for attr in ("output_dim", "head_hidden_size", "num_features"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ClinadaptError(f"cannot tell the feature size of {type(model).__name__}")
